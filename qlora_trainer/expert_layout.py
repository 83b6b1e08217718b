"""Checkpoint tensor names -> model parameters, for mixture-of-experts checkpoints as they are published.

transformers 5 keeps each MoE layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]; gpt-oss [E, H, 2I] and [E, I, H]). Checkpoints store them either so (fused) or
one 2-D tensor per expert and projection (per-expert: Mixtral `block_sparse_moe.experts.N.w1.weight`, Qwen
`mlp.experts.N.gate_proj.weight`). transformers turns the second into the first while it loads, with its weight
conversion mapping for the architecture (conversion_mapping.py: renamings such as Mixtral's block_sparse_moe ->
mlp, and WeightConverters such as MergeModulelist + Concatenate). We use that same mapping, through its own
classes, so a new MoE architecture that transformers maps is covered without a table of ours:

- `CheckpointLayout.param_of(key)`: the model parameter a checkpoint tensor fills (renamings applied);
- a checkpoint stored quantized in a format whose transformers quantizer can dequantize it (gpt-oss's MXFP4 experts
  as published: `gate_up_proj_blocks` + `gate_up_proj_scales`) gets that quantizer's own dequantizing converters
  (`update_weight_conversions` with `dequantize=True`, what `from_pretrained` runs on a machine without MXFP4
  kernels), so it streams in as full precision and is quantized to NF4 like any other;
- `CheckpointLayout.group_of(key)`: the `ExpertGroup` (one fused parameter and the checkpoint tensors that make it)
  the tensor belongs to; `ExpertGroup.fuse` builds the parameter from its tensors once all of them have arrived
  (the streaming loader buffers one group at a time, so peak host memory is about one layer's experts), and
  `ExpertGroup.split` is the inverse (the fused tensor -> the checkpoint's own tensors, with their names), for
  merge. A checkpoint already stored fused has one-tensor groups whose fuse and split are the identity.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
                                             revert_weight_conversion)

from qlora_trainer.errors import UserError


@dataclass
class ExpertGroup:
    """One fused expert parameter and the checkpoint tensors that make it, in the order transformers stacks them."""

    param: str  # model parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    keys: list[str] = field(default_factory=list)  # checkpoint tensor names
    patterns: list[str] = field(default_factory=list)  # the converter's source pattern each key matched
    converter: WeightConverter | None = None  # None: stored fused under the parameter's own name
    model: nn.Module | None = field(default=None, repr=False)
    dequantizes: bool = False  # the converter is a quantizer's (MXFP4 blocks + scales -> the full-precision param)

    @property
    def fused_in_checkpoint(self) -> bool:
        return self.converter is None

    @property
    def output_keys(self) -> list[str]:
        """The names `split` writes: the checkpoint's own, or for a checkpoint stored quantized the full-precision
        parameter's (its quantized form cannot be written back)."""
        return [self.param] if self.dequantizes else self.keys

    def fuse(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused parameter from {checkpoint key: tensor} (all of `keys`), by the converter's operations."""
        if self.converter is None:
            return tensors[self.keys[0]]
        converter = copy.deepcopy(self.converter)
        for key, pattern in zip(self.keys, self.patterns):
            converter.add_tensor(self.param, key, pattern, tensors[key])
        out = converter.convert(self.param, model=self.model, config=self.model.config)
        return out[self.param]

    def split(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of fuse: the checkpoint's tensors of this group, by name, in the checkpoint's layout (merge
        writes them back so). transformers' own save path (revert_weight_conversion) does the splitting."""
        if self.converter is None or self.dequantizes:
            return {self.output_keys[0]: fused}
        tensors = revert_weight_conversion(self.model, {self.param: fused})
        if set(tensors) != set(self.keys):  # e.g. a checkpoint saved without the base model's prefix
            by_order = sorted(tensors, key=dot_natural_key)
            if len(by_order) != len(self.keys):
                raise ValueError(f"transformers splits {self.param} into {sorted(tensors)}, not the checkpoint's "
                                 f"{self.keys}")
            tensors = {key: tensors[name] for key, name in zip(sorted(self.keys, key=dot_natural_key), by_order)}
        return {key: tensors[key].contiguous() for key in self.keys}


class CheckpointLayout:
    """How the tensors of one checkpoint fill one model's parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str], expected: dict[str, torch.Size],
                 expert_params: Iterable[str] = (), quantization_config: dict | None = None):
        """expected: every parameter's checkpoint shape; expert_params: the fused expert parameters (a checkpoint
        tensor that lands on one of them whole makes a one-tensor group); quantization_config: config.json's, for a
        checkpoint stored quantized (ValueError when transformers cannot dequantize it)."""
        self.model = model
        self.expected = expected
        self.prefix = getattr(model, "base_model_prefix", "model")
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        own = {id(t) for t in transforms}
        if quantization_config:
            transforms = dequantizing_conversions(model, quantization_config, transforms)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self._params: dict[str, str | None] = {}
        self.groups: dict[str, ExpertGroup] = {}
        self._group_of: dict[str, ExpertGroup] = {}
        expert_params = set(expert_params)
        for key in sorted(checkpoint_keys, key=dot_natural_key):
            param, pattern = self._rename(key)
            self._params[key] = param
            if param is None or (pattern is None and param not in expert_params):
                continue
            group = self.groups.setdefault(param, ExpertGroup(param, model=model))
            if pattern is not None:
                group.converter = self._by_pattern[pattern]
                group.dequantizes = id(group.converter) not in own
            group.keys.append(key)
            group.patterns.append(pattern)
            self._group_of[key] = group
        for group in self.groups.values():
            if group.converter is not None and None in group.patterns:
                raise ValueError(f"{group.param} is stored both fused and per expert ({group.keys[0]}, ...): the "
                                 "checkpoint's index names tensors of two layouts; re-save the model")

    def _rename(self, key: str) -> tuple[str | None, str | None]:
        """(model parameter or None, the converter source pattern that matched or None), as transformers renames a
        key while it loads: every renaming, then at most one converter; the name as it is when that fits better."""
        renamed, pattern = rename_source_key(key, self.renamings, self.converters)
        param = self._with_prefix(renamed)
        if param is None and pattern is not None:
            return None, None
        if param is None or (pattern is None and self._with_prefix(key) is not None):
            return self._with_prefix(key), None
        return param, pattern

    def _with_prefix(self, key: str) -> str | None:
        """Checkpoint names usually equal ours; some are saved from the bare base model (no prefix) or with it."""
        if key in self.expected:
            return key
        if f"{self.prefix}.{key}" in self.expected:
            return f"{self.prefix}.{key}"
        if key.startswith(self.prefix + ".") and key[len(self.prefix) + 1:] in self.expected:
            return key[len(self.prefix) + 1:]
        return None

    def param_of(self, key: str) -> str | None:
        """The model parameter the checkpoint tensor `key` fills (alone or as part of an expert group), or None."""
        return self._params.get(key)

    def group_of(self, key: str) -> ExpertGroup | None:
        return self._group_of.get(key)

    def per_expert_keys(self) -> bool:
        """Whether any expert parameter is stored per expert (the layout merge writes back)."""
        return any(not g.fused_in_checkpoint for g in self.groups.values())


class NotDequantizable(ValueError):
    """A checkpoint stored quantized in a format transformers cannot turn back into full precision while it loads."""


def dequantizing_conversions(model: nn.Module, quantization_config: dict, transforms: list) -> list:
    """The model's conversions plus those of the checkpoint's transformers quantizer in its dequantizing mode, which
    turn serialized quantized tensors back into full-precision parameters. ValueError naming the method when its
    quantizer has no dequantizing load (bitsandbytes, GPTQ, AWQ, ...)."""
    from transformers.quantizers import AutoHfQuantizer

    method = quantization_config.get("quant_method", "?") if isinstance(quantization_config, dict) else "?"
    try:
        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    except Exception as err:  # an unknown method, or its package missing: either way nothing to dequantize with
        raise NotDequantizable(f"quant_method={method!r}: {type(err).__name__}: {err}") from None
    if not hasattr(quantizer.quantization_config, "dequantize") or not quantizer.serialized_names \
            or "dequantize" not in quantizer.get_load_operations():
        raise NotDequantizable(f"quant_method={method!r}, which transformers cannot dequantize while it loads")
    quantizer.quantization_config.dequantize = True
    return quantizer.update_weight_conversions(transforms, model)


def fuse_or_error(group: ExpertGroup, tensors: dict[str, torch.Tensor], file: Path) -> torch.Tensor:
    """group.fuse, with per-expert shapes that do not stack or concatenate as one UserError naming the file."""
    try:
        return group.fuse(tensors)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"{file}: the per-expert tensors of {group.param} ({group.keys[0]}, ...) do not fuse into "
                        f"it ({err}): the checkpoint and config.json disagree") from None


def unexpected_tensor_message(model: nn.Module, key: str, file: Path) -> str:
    """What to say about a checkpoint tensor no parameter takes."""
    if looks_per_expert(key):
        return (f"{file}: unexpected tensor {key!r}: a per-expert tensor, and transformers has no weight conversion "
                f"for {type(model).__name__} (model_type={model.config.model_type!r}) that fuses it into the model's "
                "experts; store the experts fused as the model defines them (save_pretrained of transformers >= 5)")
    return f"{file}: unexpected tensor {key!r}: this checkpoint does not match its config.json ({type(model).__name__})"


def looks_per_expert(key: str) -> bool:
    """A checkpoint name of one expert's tensor (`...experts.3.w1.weight`): for the error when nothing maps it."""
    parts = key.split(".")
    return any(p == "experts" and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts))
