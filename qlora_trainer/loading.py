"""Load a Hugging Face model folder as NF4 without ever holding the full-precision model in memory.

1. Build the transformers architecture from config.json on the meta device (no weights allocated).
2. Swap its linear layers (all but the output layer) for empty 4-bit linears.
3. Stream the checkpoint one tensor at a time (base_model.stream_tensors): a linear weight is quantized
   on the target device as it arrives; everything else (embeddings, norms, lm_head) is cast to the
   compute dtype. Peak host memory is about one tensor plus the quantized model.

`random_quantized` fills the same skeleton with random weights instead, layer by layer, for benchmarks
of shapes (Llama-3-70B) that exist nowhere as a checkpoint on the machine.

What a load did (which linears are 4-bit and what they replaced, where the weights came from, which parameters
were created fresh) is a LoadInfo, kept on the model as `model.qlora_load_info` and read with `load_info(model)`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qlora_trainer import libc, quant
from qlora_trainer.base_model import BaseModel, checkpoint_files, prequantized_error, resolve_base, stream_tensors
from qlora_trainer.errors import UserError
from qlora_trainer.expert_layout import CheckpointLayout, NotDequantizable, fuse_or_error, unexpected_tensor_message
from qlora_trainer.experts import is_nf4_experts, swap_in_nf4_experts
from qlora_trainer.lora import linear_shape
from qlora_trainer.names import (ATTN_IMPLEMENTATIONS, AUTO, CAUSAL_LM, CLASSIFICATION, COMPUTE_DTYPES, DTYPE_NAMES,
                                 torch_dtype)

MODEL_CLASSES = {CAUSAL_LM: AutoModelForCausalLM, CLASSIFICATION: AutoModelForSequenceClassification}
LOAD_INFO_ATTR = "qlora_load_info"
logger = logging.getLogger(__name__)


@dataclass
class LoadInfo:
    """What load_quantized / random_quantized did to a model."""

    swapped: dict[str, str]  # path of each 4-bit linear -> what it replaced: "linear" or "conv1d" (GPT-2)
    source: Path | None  # the model folder (None: random weights)
    new_params: set[str] = field(default_factory=set)  # created fresh, not read from the checkpoint (a new head)
    attn_implementation: str = "sdpa"  # what transformers runs attention with (model.attn_implementation resolved)
    experts: dict[str, torch.Size] = field(default_factory=dict)  # NF4 expert weights (experts.py) -> their shape


def load_info(model: nn.Module) -> LoadInfo:
    """The LoadInfo of a model from load_quantized or random_quantized."""
    info = getattr(model, LOAD_INFO_ATTR, None)
    if info is None:
        raise ValueError("this model was not built by load_quantized or random_quantized: it has no LoadInfo")
    return info


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(compute_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmul is several times slower there) unless asked otherwise."""
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype in (None, AUTO):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if compute_dtype not in DTYPE_NAMES:
        raise UserError(f"unknown compute dtype {compute_dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    return torch_dtype(compute_dtype)


def build_empty_model(config: PretrainedConfig, *, task: str = CAUSAL_LM, num_labels: int | None = None,
                      compute_dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      attn_implementation: str = AUTO) -> nn.Module:
    """The transformers model for `config` with every parameter on the meta device (buffers stay real).
    Changes `config` (num_labels, a classifier's pad_token_id): pass a copy you can give away.

    attn_implementation (model.attn_implementation): auto lets transformers decide (sdpa where the architecture
    supports it, else eager: its own answer, see chosen_attn_implementation); any other value is passed as is, and
    one the architecture or the environment cannot run is a UserError naming the key and what to use instead."""
    if task not in MODEL_CLASSES:
        raise UserError(f"unknown model.task {task!r}: use one of {', '.join(MODEL_CLASSES)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"unknown model.attn_implementation {attn_implementation!r}: "
                        f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    auto_cls = MODEL_CLASSES[task]
    if num_labels is not None:
        config.num_labels = num_labels
    requested = None if attn_implementation == AUTO else attn_implementation  # None: transformers' own default

    def build(cfg: PretrainedConfig, attn: str | None) -> nn.Module:
        # Buffers (rotary inv_freq) are computed in __init__ and are not in checkpoints: keep them real.
        with init_empty_weights(include_buffers=False):
            # Experts eager: transformers' grouped_mm/batched_mm forwards read whole 3-D expert tensors, which
            # NF4 experts never materialize (experts.py); eager reads `gate_up_proj[e]` one expert at a time.
            return auto_cls.from_config(cfg, dtype=compute_dtype, attn_implementation=attn,
                                        experts_implementation="eager", trust_remote_code=trust_remote_code)

    spare = copy.deepcopy(config) if requested is not None else None  # to tell an attention error from the rest
    try:
        model = build(config, requested)
    except (ValueError, ImportError) as err:
        if requested is not None:
            _raise_if_attention_error(requested, err, lambda: build(spare, None))
        if isinstance(err, ImportError):
            raise
        raise UserError(
            f"unsupported architecture {type(config).__name__} (model_type={config.model_type!r}) "
            f"for task {task}: {err}"
        ) from None
    if task == CLASSIFICATION and config.pad_token_id is None:
        # The head pools the last non-padding token; without a pad id transformers cannot find it in a batch.
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    return model


def chosen_attn_implementation(model: nn.Module) -> str:
    """The attention implementation transformers set up for `model` ("sdpa", "eager", "flash_attention_2")."""
    return model.config._attn_implementation


def _first_sentence(err: BaseException) -> str:
    """The first sentence of a transformers error, on one line (its messages go on with links and examples)."""
    text = " ".join(str(err).split())
    return text.split(". ", 1)[0].rstrip(".")


def _raise_if_attention_error(requested: str, err: BaseException, build_default) -> None:
    """`requested` failed with `err`: when transformers' default builds the same model, the attention choice was the
    problem, and the UserError says so and what to use instead. Otherwise return (the architecture itself failed)."""
    try:
        model = build_default()
    except (ValueError, ImportError):
        return
    default = chosen_attn_implementation(model)
    raise UserError(f"model.attn_implementation={requested}: {_first_sentence(err)}; use model.attn_implementation="
                    f"auto (it picks {default} for {type(model).__name__}) or {default}") from None


def meta_model(base: str | os.PathLike | BaseModel, **kwargs) -> nn.Module:
    """The architecture of a model folder on the meta device (shapes only, nothing loaded): build_empty_model on a
    copy of its config. kwargs: build_empty_model's (task, num_labels, compute_dtype)."""
    base = resolve_base(base)
    return build_empty_model(base.fresh_config(), trust_remote_code=base.trust_remote_code, **kwargs)


def _unquantized_module_names(model: nn.Module) -> set[str]:
    """The modules transformers' bitsandbytes integration keeps in full precision: the output layer
    (lm_head or a classification head), whatever holds the model's last parameter, and tied weights."""
    names = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names |= {k.removesuffix(".weight") for k in list(tied) + list(tied.values())}
    names.add(list(model.named_parameters())[-1][0].rsplit(".", 1)[0])
    output = model.get_output_embeddings()
    names |= {name for name, module in model.named_modules() if output is not None and module is output}
    return names


def swap_in_nf4_linears(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, str]:
    """Replace each quantizable nn.Linear / Conv1D with an empty 4-bit linear. Returns {name: source type}."""
    keep = _unquantized_module_names(model)
    swapped = {}
    for name, module in list(model.named_modules()):
        if name in keep or not (type(module) is nn.Linear or isinstance(module, Conv1D)):
            continue
        out_features, in_features = linear_shape(module)
        if in_features % quant.BLOCKSIZE:
            # bitsandbytes' kernels need whole NF4 blocks per row; every released LLaMA-family shape has them.
            raise UserError(f"{name} takes {in_features} input features, not a multiple of the NF4 blocksize "
                            f"{quant.BLOCKSIZE}: this architecture's config.json ({type(model.config).__name__}) "
                            "cannot be stored in 4 bits; use a model whose hidden and intermediate sizes are "
                            f"multiples of {quant.BLOCKSIZE}")
        new = quant.new_nf4_linear(in_features, out_features, module.bias is not None, compute_dtype)
        model.set_submodule(name, new)
        swapped[name] = "conv1d" if isinstance(module, Conv1D) else "linear"
    return swapped


# ---------------------------------------------------------------------------------------- filling the skeleton

def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, swapped: dict[str, str],
                device: torch.device, compute_dtype: torch.dtype) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_nf4_experts(getattr(module, attr, None)):
        getattr(module, attr).quantize_from(value)  # one expert at a time, cast to the compute dtype first
    elif attr == "weight" and module_name in swapped:
        if swapped[module_name] == "conv1d":
            value = value.T  # transformers' integration quantizes Conv1D weights as (out, in) too
        # Cast to the compute dtype first, as transformers does (chunk by chunk, inside quantize_nf4): the quant
        # state then dequantizes to the compute dtype, and the packed bits equal transformers' own.
        quant.quantize_into(module, value, device, compute_dtype)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=compute_dtype), requires_grad=False)
    else:
        module._buffers[attr] = value.to(device=device)


def expected_shapes(model: nn.Module, swapped: dict[str, str],
                    experts: dict[str, torch.Size] | None = None) -> dict[str, torch.Size]:
    """Checkpoint shape of every parameter (a 4-bit linear's meta weight is already packed: use the
    original layer's shape instead; NF4 experts: the fused parameter's)."""
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    shapes.update(experts or {})
    for name, kind in swapped.items():
        module = model.get_submodule(name)
        out_f, in_f = module.out_features, module.in_features
        shapes[name + ".weight"] = torch.Size((in_f, out_f) if kind == "conv1d" else (out_f, in_f))
    return shapes


def _ignorable(model: nn.Module, key: str) -> bool:
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    patterns.append(r"rotary_emb\.inv_freq")  # older LLaMA checkpoints saved this computed buffer
    return any(re.search(p, key) for p in patterns) or is_other_task_head(model, key)


CAUSAL_HEADS = ("lm_head",)  # the output layer of a causal-LM checkpoint


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def is_other_task_head(model: nn.Module, key: str) -> bool:
    """A causal checkpoint's lm_head, loaded as a classifier: the classifier has its own head instead, and
    transformers drops this tensor too (its load report calls it UNEXPECTED)."""
    return is_classifier(model) and key.split(".", 1)[0] in CAUSAL_HEADS


def checkpoint_layout(model: nn.Module, info: LoadInfo, files: dict[str, Path],
                      base: BaseModel | None = None) -> CheckpointLayout:
    """Which parameter each checkpoint tensor fills, per-expert tensors grouped into their fused expert parameter by
    transformers' conversion mapping for the architecture (expert_layout.py); a checkpoint stored quantized (MXFP4)
    is dequantized by its transformers quantizer's converters, or is a UserError."""
    quantization_config = base.raw_config.get("quantization_config") if base is not None else None
    try:
        return CheckpointLayout(model, files, expected_shapes(model, info.swapped, info.experts), info.experts,
                                quantization_config)
    except NotDequantizable as err:
        raise prequantized_error(base, str(err)) from None
    except ValueError as err:
        raise UserError(f"{info.source}: {err}") from None


def fill_from_checkpoint(model: nn.Module, info: LoadInfo, device: torch.device, compute_dtype: torch.dtype,
                         progress: bool = True, layout: CheckpointLayout | None = None) -> None:
    """Stream the checkpoint into the skeleton. Per-expert tensors wait in a buffer until every tensor of their fused
    parameter has arrived (one MoE layer's experts at most, in a checkpoint stored layer by layer), are fused by
    transformers' operations, quantized expert by expert, and freed."""
    model_dir = info.source
    files = checkpoint_files(model_dir)
    layout = layout or checkpoint_layout(model, info, files)
    expected = layout.expected
    loaded: set[str] = set()
    waiting: dict[str, dict[str, torch.Tensor]] = {}  # fused expert parameter -> its per-expert tensors so far
    bar = tqdm(total=len(files), desc="loading NF4", unit="tensor", disable=not progress, leave=False)
    for key, tensor, file in stream_tensors(files, device):
        bar.update(1)
        name = layout.param_of(key)
        if name is None:
            if _ignorable(model, key):
                continue
            raise UserError(unexpected_tensor_message(model, key, file))
        group = layout.group_of(key)
        if group is not None and not group.fused_in_checkpoint:
            waiting.setdefault(name, {})[key] = tensor
            del tensor
            if len(waiting[name]) < len(group.keys):
                continue
            tensor = fuse_or_error(group, waiting.pop(name), file)
        if tensor.shape != expected[name]:
            shown = key if group is None or group.fused_in_checkpoint else f"{name} (fused from {len(group.keys)} " \
                                                                            "per-expert tensors)"
            raise UserError(f"{file}: tensor {shown!r} has shape {tuple(tensor.shape)}, but config.json implies "
                            f"{tuple(expected[name])}: the checkpoint and config.json disagree")
        _set_tensor(model, name, tensor, info.swapped, device, compute_dtype)
        loaded.add(name)
        del tensor
        libc.malloc_trim()
    bar.close()
    _tie_and_check_missing(model, expected, loaded | info.new_params, model_dir)


def _tie_and_check_missing(model: nn.Module, expected: dict[str, torch.Size], loaded: set[str],
                           model_dir: Path) -> None:
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    for target, source in tied.items():
        if target not in loaded and source in loaded:
            _share_parameter(model, target, source)
            loaded.add(target)
        elif source not in loaded and target in loaded:  # a checkpoint that kept only lm_head
            _share_parameter(model, source, target)
            loaded.add(source)
    missing = [name for name in expected if name not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{model_dir}: checkpoint is missing {len(missing)} tensor(s): {shown}")


def _share_parameter(model: nn.Module, target: str, source: str) -> None:
    module_name, _, attr = target.rpartition(".")
    setattr(model.get_submodule(module_name), attr, model.get_parameter(source))


# ---------------------------------------------------------------------------------------- public entry points

def load_quantized(path: str | os.PathLike | BaseModel, *, compute_dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None, task: str = CAUSAL_LM,
                   num_labels: int | None = None, trust_remote_code: bool = False,
                   progress: bool = True, attn_implementation: str = AUTO,
                   log: Callable[[str], None] | None = None) -> nn.Module:
    """Load a model folder, a cached hub id or a resolved BaseModel as NF4, ready for `apply_lora`. Frozen, eval
    mode; `load_info(model)` says what was done.

    attn_implementation: model.attn_implementation (auto, sdpa, eager, flash_attention_2). When auto cannot use sdpa
    for the architecture, one line says what it uses instead, through `log` (default: this module's logger, info)."""
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    if attn_implementation == "flash_attention_2" and device.type != "cuda":
        raise UserError(f"model.attn_implementation=flash_attention_2 needs a CUDA GPU, and this model is loaded on "
                        f"{device.type}: use model.attn_implementation=auto (sdpa, or eager where the architecture "
                        "has no sdpa)")
    base = resolve_base(path, trust_remote_code=trust_remote_code)
    model = build_empty_model(base.fresh_config(), task=task, num_labels=num_labels, compute_dtype=dtype,
                              trust_remote_code=base.trust_remote_code, attn_implementation=attn_implementation)
    info = LoadInfo(swap_in_nf4_linears(model, dtype), base.path, attn_implementation=chosen_attn_implementation(model))
    info.experts = swap_in_nf4_experts(model, dtype, device)
    if attn_implementation == AUTO and info.attn_implementation != "sdpa":
        (log or logger.info)(f"attention: {info.attn_implementation} (model.attn_implementation=auto: transformers has "
                             f"no sdpa attention for {type(model).__name__})")
    layout = checkpoint_layout(model, info, checkpoint_files(base.path), base)
    if task == CLASSIFICATION:
        info.new_params = _init_new_head(model, info, layout, dtype, device)
    fill_from_checkpoint(model, info, device, dtype, progress=progress, layout=layout)
    return _finish(model, info, device)


def _init_new_head(model: nn.Module, info: LoadInfo, layout: CheckpointLayout, dtype: torch.dtype,
                   device: torch.device) -> set[str]:
    """A classification head that a causal checkpoint lacks starts as transformers initialises it
    (normal, std = initializer_range); it is trained in full beside LoRA. Returns the new parameters' names."""
    expected = layout.expected
    present = {layout.param_of(key) for key in checkpoint_files(info.source)}
    new = {name for name in expected if name not in present and name.rpartition(".")[0] not in info.swapped
           and name not in info.experts}
    std = getattr(model.config, "initializer_range", 0.02)
    for name in sorted(new):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = torch.zeros(expected[name], dtype=dtype, device=device)
        if attr == "weight":
            nn.init.normal_(value, std=std)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return new


def _finish(model: nn.Module, info: LoadInfo, device: torch.device) -> nn.Module:
    model.to(device)  # buffers (rotary) were built on CPU
    model.requires_grad_(False)
    model.eval()
    setattr(model, LOAD_INFO_ATTR, info)
    return model


def random_quantized(config: PretrainedConfig, *, compute_dtype: str | torch.dtype | None = None,
                     device: str | torch.device | None = None, seed: int = 0, progress: bool = True) -> nn.Module:
    """A randomly initialised model of any shape, built straight into NF4 on `device` one weight at a time:
    a 70B model never exists in bf16. Random weights time and size exactly like real ones."""
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    model = build_empty_model(config, compute_dtype=dtype)
    swapped = swap_in_nf4_linears(model, dtype)
    experts = swap_in_nf4_experts(model, dtype, device)
    shapes = expected_shapes(model, swapped, experts)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)  # {target: source}: tied after filling
    for name in tqdm(list(shapes), desc="random NF4", unit="tensor", disable=not progress, leave=False):
        if name in tied or not _is_meta(model, name):
            continue
        value = _random_like(name, shapes[name], dtype, device, generator, std)
        _set_tensor(model, name, value, swapped, device, dtype)
    _tie_and_check_missing(model, shapes, {n for n in shapes if not _is_meta(model, n)}, Path("<random>"))
    info = LoadInfo(swapped, None, attn_implementation=chosen_attn_implementation(model), experts=experts)
    return _finish(model, info, device)


def _random_like(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
            or name.endswith("ln_f.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device, generator=generator) * std


def _is_meta(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    param = getattr(model.get_submodule(module_name), attr)
    if is_nf4_experts(param):
        return not bool(param.absmax.any())  # allocated empty: nothing quantized into it yet
    return param is None or param.device.type == "meta"
