"""The experts side of `merge`: a fused expert parameter, as the merged model should hold it, written back in the
checkpoint's own layout (per-expert tensors for a per-expert checkpoint, the 3-D tensor for a fused one).

merge streams the base checkpoint; the per-expert tensors of one fused parameter are gathered (expert_layout's
ExpertGroup, transformers' conversion mapping), fused, brought to what the NF4 model computes with (`into`), given
their LoRA update when the adapter has one, and split back into the checkpoint's tensors:

    merged_expert_tensors(group, fused, into=..., compute_dtype=..., delta=...) -> {checkpoint key: tensor}

`delta` is the seam for a LoRA on the experts: a function of the expert index e that returns expert e's update in
the parameter's stored orientation (the shape of `param[e]`, fp32), added before the split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pathlib import Path

from qlora_trainer import quant
from qlora_trainer.expert_layout import ExpertGroup, fuse_or_error
from qlora_trainer.names import MERGE_INTO

ExpertDelta = Callable[[int], torch.Tensor]  # expert index -> its LoRA update, shaped like param[e], fp32


def expert_base_weight(fused: torch.Tensor, *, into: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """The fused expert parameter in fp32 as the merged model should see it before any LoRA update: each expert
    rounded through NF4 exactly as loading stores it (cast to the compute dtype, then quantized on its own:
    experts.NF4ExpertWeights), or the checkpoint's values for `original`."""
    if into not in MERGE_INTO:
        raise ValueError(f"into must be one of {MERGE_INTO}, got {into!r}")
    if into == "original":
        return fused.float()
    out = torch.empty(fused.shape, dtype=torch.float32)
    for e in range(fused.shape[0]):
        out[e] = quant.quantize_dequantize(fused[e].to(compute_dtype).contiguous()).float()
    return out


def output_order(entries: list) -> list:
    """merge's entries (each with `.group`: an ExpertGroup or None) in checkpoint order, except that the tensors of
    a fused expert parameter come together where its last tensor is read: merge fuses them, merges and splits them
    back as one."""
    out, waiting = [], {}
    for entry in entries:
        if entry.group is None:
            out.append(entry)
            continue
        group = waiting.setdefault(entry.group.param, [])
        group.append(entry)
        if len(group) == len(entry.group.output_keys):
            out.extend(waiting.pop(entry.group.param))
    return out


def merged_group(group: ExpertGroup, tensors: dict[str, torch.Tensor], file: Path, *, into: str,
                 compute_dtype: torch.dtype, delta: ExpertDelta | None = None) -> dict[str, torch.Tensor]:
    """{output key: fp32 tensor} of one expert group after the merge, from its checkpoint tensors."""
    fused = fuse_or_error(group, tensors, file)
    del tensors
    return merged_expert_tensors(group, fused, into=into, compute_dtype=compute_dtype, delta=delta)


def merged_expert_tensors(group: ExpertGroup, fused: torch.Tensor, *, into: str, compute_dtype: torch.dtype,
                          delta: ExpertDelta | None = None) -> dict[str, torch.Tensor]:
    """{checkpoint key: fp32 tensor} of one fused expert parameter after the merge, in the checkpoint's layout."""
    weight = expert_base_weight(fused, into=into, compute_dtype=compute_dtype)
    if delta is not None:
        for e in range(weight.shape[0]):
            weight[e].add_(delta(e).float())
    return group.split(weight)
