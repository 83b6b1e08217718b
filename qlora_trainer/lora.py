"""Our own LoRA: a wrapper around any linear layer (4-bit or dense), by composition.

    y = base(x) + dropout(x) @ A.T @ B.T * scale,    scale = alpha / r   (rsLoRA: alpha / sqrt(r))

A is (r, in), B is (out, r); both fp32 (the optimizer's master copy) while the matmuls run in the compute
dtype of the input. Initialised as PEFT does (A kaiming-uniform with a=sqrt(5), B zero), so the same seed
and the same A/B give the same numbers in both.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_trainer import quant
from qlora_trainer.errors import UserError
from qlora_trainer.expert_lora import expert_lora_modules, expert_parameters, use_eager_experts, wrap_expert_parameter
from qlora_trainer.names import ALL_LINEAR, lora_scale  # noqa: F401 (lora_scale: re-exported)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense update LoRA adds to the weight: scale * B @ A, shape (out, in), in fp32."""
    return (B.float() @ A.float()) * scale


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r); base is frozen and may be 4-bit."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base = base
        self.out_features, self.in_features = linear_shape(base)
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        device = device_of(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        dtype = x.dtype  # the compute dtype (bf16 under autocast on GPU, fp32 on CPU)
        h = self.dropout(x) @ self.lora_A.to(dtype).T  # (..., r)
        return y + (h @ self.lora_B.to(dtype).T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A, self.lora_B, self.scale)

    def merge(self) -> None:
        """Fold the update into a dense base weight (not possible for a 4-bit base: see merge.py)."""
        self._add_to_base(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        self._add_to_base(-1.0)
        self.merged = False

    def _add_to_base(self, sign: float) -> None:
        if quant.is_nf4_linear(self.base):
            raise TypeError("cannot merge in place into a 4-bit weight: use qlora_trainer.merge to write a merged "
                            "model")
        if self.merged == (sign > 0):
            raise RuntimeError("already merged" if self.merged else "not merged")
        weight = self.base.weight
        delta = self.delta_weight()
        if isinstance(self.base, Conv1D):
            delta = delta.T  # Conv1D stores (in, out)
        with torch.no_grad():
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of any linear layer: nn.Linear, a 4-bit linear, a LoRA layer, or GPT-2's Conv1D, which stores its
    weight as (in, out). The one place that knows the Conv1D orientation for shapes."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def matches_target(path: str, target: str) -> bool:
    """PEFT's rule for a target_modules entry: the module path itself, or its last dotted parts."""
    return path == target or path.endswith("." + target)


def device_of(module: nn.Module) -> torch.device:
    """Where a module's tensors live (CPU for a module without any)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, Conv1D) or quant.is_nf4_linear(module)


def linear_module_names(model: nn.Module) -> list[str]:
    """Every linear layer LoRA may wrap: all linears except the output layer (lm_head, or the head of a
    classifier, which trains in full instead). This is what PEFT calls "all-linear"."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {"score", "classifier"}
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or module is output or name.rsplit(".", 1)[-1] in head_names:
            continue
        names.append(name)
    return names


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Paths for `targets`: "all-linear" (every linear but the output layer, and every expert weight of an MoE layer,
    never its router), or names matched on the last path part(s) the way PEFT matches target_modules ("q_proj"
    matches "model.layers.0.self_attn.q_proj", "gate_up_proj" matches "model.layers.0.mlp.experts.gate_up_proj")."""
    candidates = linear_module_names(model) + list(expert_parameters(model))
    if targets == ALL_LINEAR:
        return candidates
    if isinstance(targets, str):
        targets = [targets]
    chosen, unmatched = [], []
    for target in targets:
        hits = [n for n in candidates if matches_target(n, target)]
        if not hits:
            unmatched.append(target)
        chosen.extend(h for h in hits if h not in chosen)
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise UserError(f"lora.targets: {', '.join(unmatched)} match no linear layer or expert weight of this model; "
                        f"its linear layers and expert weights are: {', '.join(kinds)} (or use all-linear)")
    return chosen


def apply_lora(model: nn.Module, targets: str | list[str] = ALL_LINEAR, *, r: int = 16, alpha: float = 32,
               dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Freeze the model and wrap each target linear in a LoRALinear and each target expert weight in an ExpertLoRA
    (which has no dropout: see expert_lora.py), in place. Returns the wrapped paths."""
    model.requires_grad_(False)
    names = resolve_targets(model, targets)
    experts = expert_parameters(model)
    for name in names:
        if name in experts:
            layer = wrap_expert_parameter(model, name, r, alpha, use_rslora)
        else:
            layer = LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora)
            model.set_submodule(name, layer)
        layer.train(model.training)  # a new module is in training mode; follow the model (dropout off in eval)
    if any(name in experts for name in names):
        use_eager_experts(model)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: layer} of every LoRALinear and every ExpertLoRA (under its parameter path)."""
    return {**lora_modules(model), **expert_lora_modules(model)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{<module path>.lora_A: (r, in), <module path>.lora_B: (out, r)} of every LoRA layer; an expert weight's are
    PEFT's (r*E, in) and (out, r*E), under its parameter path."""
    state = {}
    for name, module in lora_layers(model).items():
        state[f"{name}.lora_A"] = module.lora_A
        state[f"{name}.lora_B"] = module.lora_B
    return state


def trainable_parameter_summary(model: nn.Module) -> tuple[int, int, str]:
    """(trainable, total, line) counted as PEFT's print_trainable_parameters does: a 4-bit weight counts
    two parameters per packed byte."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if quant.is_nf4_param(param):
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    return trainable, total, line
