"""LoRA on the experts of a mixture-of-experts layer, in PEFT's `target_parameters` layout (peft 0.21).

transformers 5 keeps the experts of an MoE layer fused: one 3-D parameter per projection, e.g.
`model.layers.0.mlp.experts.gate_up_proj`, stored (E, out, in) for Mixtral and Qwen-MoE (forward `F.linear(x, W[e])`)
or (E, in, out) for gpt-oss (its experts module says `is_transposed`; forward `x @ W[e]`). The eager forward reads one
expert at a time as `self.gate_up_proj[e]`. ExpertLoRA takes that attribute's place and returns `base[e] + delta_e`
there, so only the experts a batch routes to get an update, and a dense update of all experts is never formed.

PEFT's layout, from peft/tuners/lora/layer.py (ParamWrapper: _get_in_out_features, update_layer, get_delta_weight)
and checked against PEFT itself by tests/test_expert_lora.py:

    a parameter of shape (E, d1, d2): PEFT reads (in, out) = (d1, d2), then swaps them unless the experts module has
    is_transposed, so (in, out) = (d2, d1) for (E, out, in) storage and (d1, d2) for (E, in, out) storage.
    lora_A = nn.Linear(in, r * E)  ->  A (r*E, in);   expert e's rows:    A_e = A.view(E, r, in)[e]          (r, in)
    lora_B = nn.Linear(r * E, out) ->  B (out, r*E);  expert e's columns: B_e = B.view(out, r, E)[:, :, e]   (out, r)
    delta_e = scale * B_e @ A_e  (out, in), added as delta_e.T to an (E, in, out) parameter
    scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); init A kaiming-uniform (a = sqrt(5)), B = 0.
    No dropout: x cannot be factored out of a weight update, and PEFT refuses lora_dropout != 0 with target_parameters.

Tensor names: PEFT wraps one parameter per ParamWrapper; several parameters of one module are nested in the order the
module registers them (transformers: gate_up_proj, then down_proj), the last one outermost:

    base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight   gate_up_proj's A (r*E, in)
    base_model.model.model.layers.0.mlp.experts.lora_A.weight              down_proj's A    (r*E, in)

adapter_config.json lists them in `target_parameters` as "<module>.<parameter>" suffixes (["experts.down_proj",
"experts.gate_up_proj"]), matched like target_modules: the path itself or its last dotted parts.

The base may be a plain 3-D nn.Parameter or an expert weight store: a module with .shape, .dtype and __getitem__(e)
returning expert e's dense weight in the stored orientation (the NF4 store dequantizes just that expert). ExpertLoRA
keeps the same contract, so the experts' forward cannot tell it from the parameter it replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from qlora_trainer.names import EXPERT_PROJECTIONS, lora_scale


# ------------------------------------------------------------------------------------------ the maths (pure)

def per_expert_factors(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (r*E, in) A and (out, r*E) B as per-expert stacks: A (E, r, in), B (E, out, r)."""
    A_e = A.reshape(num_experts, -1, A.shape[-1])  # row e*r + k is expert e's k-th row
    B_e = B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)  # column k*E + e is expert e's k-th column
    return A_e, B_e


def expert_delta(A: torch.Tensor, B: torch.Tensor, scale: float, *, num_experts: int,
                 transposed: bool) -> torch.Tensor:
    """The update of a whole 3-D expert parameter, in fp32 and in its stored orientation: (E, out, in), or (E, in, out)
    when `transposed` (gpt-oss). What merge adds to the fused checkpoint tensor (and to each per-expert tensor)."""
    A_e, B_e = per_expert_factors(A.float(), B.float(), num_experts)
    delta = torch.bmm(B_e, A_e).mul_(scale)  # (E, out, in)
    return delta.transpose(1, 2).contiguous() if transposed else delta


def expert_update(A: torch.Tensor, B: torch.Tensor, scale: float, *, num_experts: int,
                  transposed: bool) -> Callable[[int], torch.Tensor]:
    """expert e -> the update of its weight alone (fp32, stored orientation): merge adds it one expert at a time,
    so no update of all experts at once is built (merge_experts.merged_expert_tensors' `delta`)."""
    A_e, B_e = per_expert_factors(A.float(), B.float(), num_experts)

    def update(e: int) -> torch.Tensor:
        delta = (B_e[e] @ A_e[e]).mul_(scale)
        return delta.T if transposed else delta
    return update


def expert_in_out(shape: tuple[int, int, int], transposed: bool) -> tuple[int, int]:
    """(in, out) of each expert of a parameter of this stored shape, as PEFT reads it."""
    _, d1, d2 = shape
    return (d1, d2) if transposed else (d2, d1)


# ------------------------------------------------------------------------------------------ the layer

class ExpertLoRA(nn.Module):
    """base[e] + scale * B_e @ A_e for each expert e of a 3-D expert weight (a Parameter or a store); base frozen."""

    def __init__(self, base: nn.Parameter | nn.Module, r: int, alpha: float, use_rslora: bool = False, *,
                 transposed: bool):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        if len(base.shape) != 3:
            raise ValueError(f"an expert weight is 3-D (experts, ., .), got shape {tuple(base.shape)}")
        base.requires_grad_(False)
        self.base = base  # a Parameter registers as a parameter, a store as a submodule
        self.num_experts = base.shape[0]
        self.transposed = transposed
        self.in_features, self.out_features = expert_in_out(tuple(base.shape), transposed)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.dropout_p = 0.0  # see the module docstring
        self.scale = lora_scale(r, alpha, use_rslora)
        device = _device_of(base)
        rows = r * self.num_experts
        self.lora_A = nn.Parameter(torch.empty(rows, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rows, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's reset_lora_parameters on nn.Linear(in, r*E)

    # the expert weight store contract: shape, dtype, [e]
    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        """Expert `expert`'s weight with its update, in the stored orientation and the base's dtype."""
        weight = self.base[expert]  # (out, in), or (in, out) when transposed
        dtype = weight.dtype  # the compute dtype, as LoRALinear's matmuls run in the input's
        A = self.lora_A.view(self.num_experts, self.r, self.in_features)[expert].to(dtype)  # (r, in)
        B = self.lora_B.view(self.out_features, self.r, self.num_experts)[:, :, expert].to(dtype)  # (out, r)
        delta = (B @ A) * self.scale  # (out, in)
        return weight + (delta.T if self.transposed else delta)

    def delta_weight(self) -> torch.Tensor:
        """The update of all experts, fp32, shaped like the base (for tests and merge; never in the forward)."""
        return expert_delta(self.lora_A, self.lora_B, self.scale, num_experts=self.num_experts,
                            transposed=self.transposed)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scale={self.scale:g}, transposed={self.transposed}")


def _device_of(base: nn.Parameter | nn.Module) -> torch.device:
    if isinstance(base, torch.Tensor):
        return base.device
    for tensor in list(base.parameters()) + list(base.buffers()):
        return tensor.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ finding and wrapping

def _experts_modules(model: nn.Module):
    """(path, module) of every experts module of transformers' `@use_experts_implementation` kind."""
    for name, module in model.named_modules():
        if hasattr(module, "is_transposed") and hasattr(module, "num_experts"):
            yield name, module


def expert_parameters(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{parameter path: (experts, out, in)} of every 3-D expert weight LoRA may target, wrapped or not, module by
    module, each module's projections in EXPERT_PROJECTIONS' order (the order transformers registers them in)."""
    found = {}
    for name, module in _experts_modules(model):
        for attr in EXPERT_PROJECTIONS:
            weight = getattr(module, attr, None)
            if weight is not None and len(getattr(weight, "shape", ())) == 3:
                in_f, out_f = expert_in_out(tuple(weight.shape), bool(module.is_transposed))
                found[f"{name}.{attr}" if name else attr] = (weight.shape[0], out_f, in_f)
    return found


def expert_lora_modules(model: nn.Module) -> dict[str, ExpertLoRA]:
    """{parameter path: ExpertLoRA} of every wrapped expert weight."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLoRA)}


def wrap_expert_parameter(model: nn.Module, path: str, r: int, alpha: float, use_rslora: bool = False) -> ExpertLoRA:
    """Put an ExpertLoRA in place of the expert weight at `path` (a Parameter or a store), under the same name."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    base = getattr(parent, attr)
    layer = ExpertLoRA(base, r, alpha, use_rslora, transposed=bool(parent.is_transposed))
    if attr in parent._parameters:
        delattr(parent, attr)  # a Parameter and a submodule cannot share the name
    setattr(parent, attr, layer)
    return layer


def use_eager_experts(model: nn.Module) -> None:
    """Make every experts module run transformers' eager forward, which reads one expert at a time through [e]: the
    grouped_mm and batched_mm forwards (the default where torch has grouped_mm) read the whole 3-D tensor at once."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    for _, module in _experts_modules(model):
        config = getattr(module, "config", None)
        if config is not None and config._experts_implementation != "eager":
            config._experts_implementation = "eager"
