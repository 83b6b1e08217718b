"""Mixture-of-experts weights in NF4: each 3-D expert parameter of a transformers 5 experts module
(`experts.gate_up_proj`, `experts.down_proj`) becomes an NF4ExpertWeights under the same attribute name.

transformers' eager experts forward reads one expert at a time (`self.gate_up_proj[expert_idx]`, for the experts
the batch routes to), so an object with that indexing is all it needs: each expert is quantized on its own (NF4,
double quantization, blocksize 64, through quant.py) and `experts.gate_up_proj[e]` dequantizes expert e alone, in
the compute dtype and the stored orientation. The routers (gates) and the expert biases (gpt-oss) stay full-precision
parameters, as transformers' bitsandbytes integration keeps them.

The contract other modules rely on (a LoRA on experts wraps either a plain 3-D Parameter or this module): an
nn.Module under the parameter's attribute name with `.shape` (the torch.Size of the parameter it replaces), `.dtype`
(the compute dtype), `.num_experts`, and `__getitem__(e)` (e an int or a 0-d tensor) returning expert e's dense
weight, equal to `param[e]` up to NF4 rounding.

transformers may run experts through batched or grouped matmuls over the whole 3-D tensor (`@use_experts_implementation`
dispatches on `config._experts_implementation`, "grouped_mm" by default where torch has it): build_empty_model passes
experts_implementation="eager" for every model we load, which keeps the per-expert path. The backward does not keep
the dequantized experts either: it dequantizes them again (see "backward without copies" below).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from qlora_trainer import quant
from qlora_trainer.errors import UserError


class NF4ExpertWeights(nn.Module):
    """The NF4 storage of one 3-D expert parameter [num_experts, ...]; experts are quantized one at a time
    (`quantize_expert`, or `quantize_from` for a whole fused tensor) and dequantized one at a time (`[e]`)."""

    def __init__(self, shape: torch.Size, compute_dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = compute_dtype
        self.num_experts = self.shape[0]
        numel = math.prod(self.shape[1:])
        if numel % quant.BLOCKSIZE:
            raise ValueError(f"an expert of shape {tuple(self.shape[1:])} is not a whole number of NF4 blocks "
                             f"({quant.BLOCKSIZE} values)")
        blocks = numel // quant.BLOCKSIZE
        e = self.num_experts
        self.register_buffer("packed", torch.zeros(e, numel // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(e, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax2", torch.zeros(e, math.ceil(blocks / 256), dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros(e, dtype=torch.float32, device=device))
        code, code2 = quant.nf4_code_tables(device)
        self.register_buffer("code", code)
        self.register_buffer("code2", code2)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def quantize_expert(self, e: int, weight: torch.Tensor) -> None:
        """Store expert e's weight (the parameter's [e] slice), cast to the compute dtype first, as transformers casts
        a linear before bitsandbytes quantizes it."""
        if tuple(weight.shape) != tuple(self.shape[1:]):
            raise ValueError(f"expert weight of shape {tuple(weight.shape)}, expected {tuple(self.shape[1:])}")
        parts = quant.quantize_nf4_parts(weight.to(self.device), self.dtype)
        for name, value in parts.items():
            getattr(self, name)[e].copy_(value)

    def quantize_from(self, fused: torch.Tensor) -> None:
        """Store every expert of a full-precision fused tensor of `shape`, one expert at a time."""
        if tuple(fused.shape) != tuple(self.shape):
            raise ValueError(f"fused expert tensor of shape {tuple(fused.shape)}, expected {tuple(self.shape)}")
        for e in range(self.num_experts):
            self.quantize_expert(e, fused[e])

    def __getitem__(self, e: int | torch.Tensor) -> torch.Tensor:
        e = int(e)
        if not -self.num_experts <= e < self.num_experts:
            raise IndexError(f"expert {e} of {self.num_experts}")
        weight = self._dequantize(e)
        address = weight.untyped_storage().data_ptr()
        _HANDED_OUT[address] = (weakref.ref(weight, lambda ref: _forget(address, ref)), self, e)
        return weight

    def _dequantize(self, e: int) -> torch.Tensor:
        return quant.dequantize_nf4_parts(self.packed[e], self.absmax[e], self.absmax2[e], self.offset[e],
                                          self.shape[1:], self.dtype, self.code, self.code2)

    def __len__(self) -> int:
        return self.num_experts

    def nbytes(self) -> int:
        """Bytes this storage holds (codes, both levels of statistics and the code tables)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, nf4"


# ---------------------------------------------------------------------------------------- backward without copies
#
# The experts forward computes F.linear(x, experts.gate_up_proj[e]); autograd saves that dequantized weight for x's
# gradient, so one forward would keep every routed expert of every layer in full precision until the backward.
# While an experts module runs, saved-tensor hooks store such a weight as (storage, e) instead, and the backward
# dequantizes it again: the NF4 codes are the only copy, as bitsandbytes' MatMul4Bit does for a 4-bit linear.
# Under activation checkpointing the layer's recomputation runs the same hooks, so what checkpointing stores stays
# the same in both passes.

_HANDED_OUT: dict[int, tuple] = {}  # storage address of a weight __getitem__ returned -> (weakref, storage, e)


def _forget(address: int, ref: weakref.ref) -> None:
    """A handed-out weight died: drop its entry (unless a newer weight took its address already)."""
    if _HANDED_OUT.get(address, (None,))[0] is ref:
        del _HANDED_OUT[address]


def _pack(tensor: torch.Tensor):
    try:
        entry = _HANDED_OUT.get(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: never one of ours
        return tensor
    if entry is None or entry[0]() is None:
        return tensor
    _, storage, e = entry
    return (storage, e, tensor.size(), tensor.stride(), tensor.storage_offset())


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    storage, e, size, stride, offset = packed
    return storage._dequantize(e).as_strided(size, stride, offset)  # the same view of the weight autograd saved


def _enter_hooks(module: nn.Module, args) -> None:
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    hooks.__enter__()
    module._qlora_saved_hooks = hooks


def _exit_hooks(module: nn.Module, args, output) -> None:
    hooks = module.__dict__.pop("_qlora_saved_hooks", None)
    if hooks is not None:
        hooks.__exit__(None, None, None)
    _HANDED_OUT.clear()  # the weights handed out during this forward are saved as (storage, e) or gone


def is_nf4_experts(module: nn.Module) -> bool:
    return isinstance(module, NF4ExpertWeights)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers 5 experts module: its class went through `@use_experts_implementation`, whose __init__ sets
    these attributes (integrations/moe.py)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated"))


def expert_parameter_names(model: nn.Module) -> dict[str, torch.Size]:
    """{path: shape} of every 3-D expert weight of the model's experts modules (not their 2-D biases)."""
    found = {}
    for module_name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                found[f"{module_name}.{attr}"] = param.shape
    return found


def swap_in_nf4_experts(model: nn.Module, compute_dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> dict[str, torch.Size]:
    """Replace each 3-D expert parameter by an empty NF4ExpertWeights on `device` (filled while loading).
    Returns {path: shape of the parameter it replaced}."""
    swapped = expert_parameter_names(model)
    for name, shape in swapped.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        del module._parameters[attr]
        try:
            storage = NF4ExpertWeights(shape, compute_dtype, device)
        except ValueError as err:
            raise UserError(f"{name}: {err}: this architecture's config.json ({type(model.config).__name__}) cannot "
                            f"store its experts in 4 bits; use a model whose expert sizes are multiples of "
                            f"{quant.BLOCKSIZE}") from None
        module.add_module(attr, storage)
    for module_name in {name.rpartition(".")[0] for name in swapped}:
        experts = model.get_submodule(module_name)
        experts.register_forward_pre_hook(_enter_hooks)
        experts.register_forward_hook(_exit_hooks, always_call=True)
    return swapped
