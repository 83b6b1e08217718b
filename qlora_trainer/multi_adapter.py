"""Many adapters over one base, in one batch (S-LoRA style): each row of a batch names its adapter, or none.

    y = base(x)                                   one pass of the shared (4-bit) base for the whole batch
    for each adapter k present in the batch:      rows_k = the rows that name k (gathered once per batch)
        y[rows_k] += (x[rows_k] @ A_k.T) @ B_k.T * scale_k

The base matmul, the expensive part, is shared; each adapter present costs one pair of small matmuls over its
own rows; rows that name no adapter get the bare base. Adapters may differ in rank, alpha and targets: a layer
only holds the adapters that target it. `AdapterRouting` is one object shared by every layer of a model, so
choosing the rows' adapters for a batch is one call, not one per layer.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import DynamicCache

from qlora_trainer.adapter import Adapter, validate
from qlora_trainer.errors import UserError
from qlora_trainer.generate import next_token
from qlora_trainer.lora import device_of, linear_shape, lora_modules


class AdapterRouting:
    """Which adapter each row of the current batch uses; shared by every MultiLoRALinear of one model."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.groups: list[tuple[str, torch.Tensor]] = []  # (adapter name, its row indices (n_k,)) per adapter present
        self.batch_size: int | None = None

    def set_rows(self, row_adapters: list[str | None], device: torch.device | str = "cpu") -> None:
        """row_adapters[i]: the adapter of row i, or None for the base alone."""
        unknown = sorted({n for n in row_adapters if n is not None and n not in self.names})
        if unknown:
            raise UserError(f"no adapter named {', '.join(unknown)}: loaded are {', '.join(self.names) or 'none'}")
        index = {name: i for i, name in enumerate(self.names)}
        ids = torch.tensor([-1 if n is None else index[n] for n in row_adapters], device=device)  # (B,)
        self.groups = [(self.names[k], (ids == k).nonzero().squeeze(1)) for k in sorted(set(ids.tolist())) if k >= 0]
        self.batch_size = len(row_adapters)

    def clear(self) -> None:
        self.groups, self.batch_size = [], None


class MultiLoRALinear(nn.Module):
    """A frozen linear (4-bit or dense) plus any number of named LoRA adapters, applied per row of the batch."""

    def __init__(self, base: nn.Module, routing: AdapterRouting):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = linear_shape(base)
        self.routing = routing
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.scales: dict[str, float] = {}
        base.requires_grad_(False)

    def add_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        device = device_of(self.base)
        self.lora_A[name] = nn.Parameter(A.to(device, torch.float32), requires_grad=False)
        self.lora_B[name] = nn.Parameter(B.to(device, torch.float32), requires_grad=False)
        self.scales[name] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in)
        y = self.base(x)  # (B, T, out)
        if self.routing.batch_size is not None and x.shape[0] != self.routing.batch_size:
            raise ValueError(f"the batch has {x.shape[0]} rows, but adapters were routed for "
                             f"{self.routing.batch_size}: call set_rows with one entry per row")
        dtype = x.dtype
        for name, rows in self.routing.groups:
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            h = x.index_select(0, rows) @ self.lora_A[name].to(dtype).T  # (n_k, T, r_k)
            delta = (h @ self.lora_B[name].to(dtype).T) * self.scales[name]  # (n_k, T, out)
            y.index_add_(0, rows, delta.to(y.dtype))  # y is this call's own output: no copy of the batch
        return y

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={a.shape[0]}" for n, a in self.lora_A.items())
        return f"in={self.in_features}, out={self.out_features}, adapters={{{ranks}}}"


def load_adapters_into(model: nn.Module, adapters: dict[str, str | os.PathLike], *,
                       check_base: bool = True) -> AdapterRouting:
    """Wrap every linear that any of `adapters` ({name: folder}) targets in a MultiLoRALinear holding each
    adapter's A/B; the model must be a fresh base from load_quantized. Returns the shared routing; call
    routing.set_rows([...]) before each batch."""
    if lora_modules(model) or any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: load the adapters into a fresh base model")
    read: dict[str, Adapter] = {}
    for name, folder in adapters.items():
        adapter = validate(model, folder, check_base=check_base)
        if adapter.extra:
            raise UserError(f"{folder}: has modules_to_save ({', '.join(sorted(adapter.extra))}), fully trained "
                            "modules that rows cannot share: serve this adapter on its own (--adapter DIR)")
        if adapter.experts:
            raise UserError(f"{folder}: has LoRA on expert weights ({len(adapter.experts)}), which several adapters in "
                            "one batch do not support yet: serve this adapter on its own (--adapter DIR)")
        read[name] = adapter
    routing = AdapterRouting(list(adapters))
    layers: dict[str, MultiLoRALinear] = {}
    for name, adapter in read.items():
        for path, (A, B) in adapter.weights.items():
            if path not in layers:
                layers[path] = MultiLoRALinear(model.get_submodule(path), routing)
                model.set_submodule(path, layers[path])
            layers[path].add_adapter(name, A, B, adapter.scale)
    return routing


# ---------------------------------------------------------------------------------------- batched decoding

@torch.no_grad()
def generate_batch_ids(model, prompts: list[list[int]], *, max_new_tokens: int, eos: set[int], pad_id: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0) -> list[list[int]]:
    """New token ids for each prompt, decoded together: prompts left-padded, one KV cache, rows stop at their own
    EOS. Each row samples from its own generator seeded with `seed`, so it gets what generate_ids gives it alone."""
    if any(not p for p in prompts):
        raise UserError("a prompt is empty after tokenization")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): each row counts from its first real token
    generators = [None] * len(prompts)
    if temperature > 0:
        base_seed = seed if seed is not None else torch.seed()
        generators = [torch.Generator(device=device).manual_seed(base_seed) for _ in prompts]
    cache = DynamicCache(config=model.config)
    out: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * len(prompts)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # (B, V)
        step = []
        for i, row_logits in enumerate(logits):
            token = pad_id
            if not done[i]:
                token = next_token(row_logits, temperature=temperature, top_p=top_p, generator=generators[i])
                if token in eos:
                    done[i], token = True, pad_id
                else:
                    out[i].append(token)
            step.append(token)
        if all(done):
            break
        ids = torch.tensor(step, device=device)[:, None]  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
    return out
