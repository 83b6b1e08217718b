"""Load a Hugging Face model folder as NF4 without ever holding the full-precision model in memory.

1. Build the transformers architecture from config.json on the meta device (no weights allocated).
2. Swap its linear layers (all but the output layer) for empty 4-bit linears.
3. Stream the checkpoint one tensor at a time with `safetensors.safe_open`: a linear weight is quantized
   on the target device as it arrives; everything else (embeddings, norms, lm_head) is cast to the
   compute dtype. Peak host memory is about one tensor plus the quantized model.

`random_quantized` fills the same skeleton with random weights instead, layer by layer, for benchmarks
of shapes (Llama-3-70B) that exist nowhere as a checkpoint on the machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qlora_trainer import quant
from qlora_trainer.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TASKS = {"causal_lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(compute_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmul is several times slower there) unless asked otherwise."""
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if compute_dtype not in DTYPES:
        raise UserError(f"unknown compute dtype {compute_dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[compute_dtype]


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local model folder, or a hub id that is already in the local cache (we never download)."""
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{local}: no config.json in this folder: point model.path/--base at a Hugging Face model folder")
        return local
    if local.exists():
        raise UserError(f"{local}: is a file, not a model folder (config.json + *.safetensors)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not a valid repo id, or not in the cache: both mean "no such model here"
        raise UserError(
            f"{path}: no such folder, and not a model in the local Hugging Face cache "
            "(nothing is downloaded at run time: download it first, e.g. `huggingface-cli download ...`)"
        ) from None


def read_config(model_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    config_file = model_dir / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file}: cannot read it as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object (model_type, hidden_size, ...), "
                        f"found a {type(raw).__name__}")
    if "auto_map" in raw and not trust_remote_code:
        # A model that ships its own Python code: we never run it unless the user says so.
        if raw.get("model_type") not in _known_model_types():
            raise UserError(
                f"{config_file}: this model needs its own Python code (auto_map), which we do not run by default; "
                "set model.trust_remote_code=true only if you trust its authors"
            )
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        raise UserError(
            f"{config_file}: unsupported architecture (model_type={raw.get('model_type')!r}): "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else repr(err)}"
        ) from None


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def build_empty_model(config: PretrainedConfig, *, task: str = "causal_lm", num_labels: int | None = None,
                      compute_dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The transformers model for `config` with every parameter on the meta device (buffers stay real)."""
    if task not in TASKS:
        raise UserError(f"unknown model.task {task!r}: use one of {', '.join(TASKS)}")
    auto_cls = TASKS[task]
    if num_labels is not None:
        config.num_labels = num_labels
    try:
        # Buffers (rotary inv_freq) are computed in __init__ and are not in checkpoints: keep them real.
        with init_empty_weights(include_buffers=False):
            model = auto_cls.from_config(config, dtype=compute_dtype, attn_implementation="sdpa",
                                         trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UserError(
            f"unsupported architecture {type(config).__name__} (model_type={config.model_type!r}) "
            f"for task {task}: {err}"
        ) from None
    if task == "classification" and config.pad_token_id is None:
        # The head pools the last non-padding token; without a pad id transformers cannot find it in a batch.
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    return model


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
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
        else:
            in_features, out_features = module.in_features, module.out_features
        new = quant.new_nf4_linear(in_features, out_features, module.bias is not None, compute_dtype)
        model.set_submodule(name, new)
        swapped[name] = "conv1d" if isinstance(module, Conv1D) else "linear"
    return swapped


# ---------------------------------------------------------------------------------------- checkpoint files

def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: file} for a single-file or sharded (index.json) safetensors checkpoint."""
    index_file = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}, not a mapping")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index_file}: not a valid safetensors index ({err!r}): re-save the model") from None
        files = {}
        for key, shard in weight_map.items():
            files[key] = _shard_path(model_dir, shard, index_file)
        return files
    if single.is_file():
        return {key: single for key in _keys_in(single)}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise UserError(
            f"{model_dir}: only PyTorch pickle weights (*.bin/*.pt) here; we load safetensors only because "
            "pickles can run code. Convert with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json in this folder")


def _shard_path(model_dir: Path, shard: str, index_file: Path) -> Path:
    """A shard named by the index must be a plain file name inside the model folder."""
    if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts or "/" in shard \
            or "\\" in shard:
        raise UserError(f"{index_file}: shard name {shard!r} points outside the model folder; refusing to read it")
    path = model_dir / shard
    if not path.is_file():
        raise UserError(f"{index_file}: names shard {shard}, which is missing from {model_dir}")
    return path


def _keys_in(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file}: not a readable safetensors file ({err}): the download may be incomplete") from None


def stream_tensors(files: dict[str, Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) one at a time, grouped by shard.

    Each tensor is read with its own short `safe_open`: a file kept open would stay memory-mapped and
    the pages already read would count toward our resident memory until the whole shard is done."""
    read_device = "cpu" if device.type == "cpu" else str(device)
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        for key in keys:
            try:
                with safe_open(file, framework="pt", device=read_device) as f:
                    tensor = f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as err:
                raise UserError(f"{file}: cannot read tensor {key!r} ({err}): the file may be truncated or corrupt") \
                    from None
            yield key, tensor, file


# ---------------------------------------------------------------------------------------- filling the skeleton

def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, swapped: dict[str, str],
                device: torch.device, compute_dtype: torch.dtype) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr == "weight" and module_name in swapped:
        if swapped[module_name] == "conv1d":
            value = value.T  # transformers' integration quantizes Conv1D weights as (out, in) too
        # Cast to the compute dtype first, as transformers does (chunk by chunk, inside quantize_nf4): the quant
        # state then dequantizes to the compute dtype, and the packed bits equal transformers' own.
        quant.quantize_into(module, value, device, compute_dtype)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=compute_dtype), requires_grad=False)
    else:
        module._buffers[attr] = value.to(device=device)


def expected_shapes(model: nn.Module, swapped: dict[str, str]) -> dict[str, torch.Size]:
    """Checkpoint shape of every parameter (a 4-bit linear's meta weight is already packed: use the
    original layer's shape instead)."""
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    for name, kind in swapped.items():
        module = model.get_submodule(name)
        out_f, in_f = module.out_features, module.in_features
        shapes[name + ".weight"] = torch.Size((in_f, out_f) if kind == "conv1d" else (out_f, in_f))
    return shapes


def checkpoint_key_to_param(key: str, expected: dict[str, torch.Size], prefix: str) -> str | None:
    """Checkpoint names usually equal ours; some are saved from the bare base model (no prefix) or with it."""
    if key in expected:
        return key
    if f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


def _ignorable(model: nn.Module, key: str) -> bool:
    import re

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


def fill_from_checkpoint(model: nn.Module, swapped: dict[str, str], model_dir: Path, device: torch.device,
                         compute_dtype: torch.dtype, progress: bool = True) -> None:
    files = checkpoint_files(model_dir)
    expected = expected_shapes(model, swapped)
    prefix = getattr(model, "base_model_prefix", "model")
    loaded: set[str] = set()
    bar = tqdm(total=len(files), desc="loading NF4", unit="tensor", disable=not progress, leave=False)
    for key, tensor, file in stream_tensors(files, device):
        bar.update(1)
        name = checkpoint_key_to_param(key, expected, prefix)
        if name is None:
            if _ignorable(model, key):
                continue
            raise UserError(f"{file}: unexpected tensor {key!r}: this checkpoint does not match its config.json "
                            f"({type(model).__name__})")
        if tensor.shape != expected[name]:
            raise UserError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but config.json implies "
                            f"{tuple(expected[name])}: the checkpoint and config.json disagree")
        _set_tensor(model, name, tensor, swapped, device, compute_dtype)
        loaded.add(name)
        del tensor
        return_freed_memory_to_os()
    bar.close()
    _tie_and_check_missing(model, expected, loaded, model_dir)


def return_freed_memory_to_os() -> None:
    """glibc keeps freed blocks for reuse; after each streamed tensor the heap is full of holes the size of a
    weight, and resident memory creeps up by a large fraction of the model. malloc_trim hands them back."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


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
    missing = [name for name in expected if name not in loaded and not _initialised_by_us(model, name)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{model_dir}: checkpoint is missing {len(missing)} tensor(s): {shown}")


def _share_parameter(model: nn.Module, target: str, source: str) -> None:
    module_name, _, attr = target.rpartition(".")
    setattr(model.get_submodule(module_name), attr, model.get_parameter(source))


def _initialised_by_us(model: nn.Module, name: str) -> bool:
    """A new classification head is not in a causal checkpoint: it is created fresh (see init_new_head)."""
    return name in getattr(model, "_qlora_new_params", set())


# ---------------------------------------------------------------------------------------- public entry points

def load_quantized(path: str | os.PathLike, *, compute_dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None, task: str = "causal_lm",
                   num_labels: int | None = None, trust_remote_code: bool = False,
                   progress: bool = True) -> nn.Module:
    """Load a model folder (or cached hub id) as NF4, ready for `apply_lora`. Frozen, eval mode."""
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir, trust_remote_code)
    model = build_empty_model(config, task=task, num_labels=num_labels, compute_dtype=dtype,
                              trust_remote_code=trust_remote_code)
    swapped = swap_in_nf4_linears(model, dtype)
    if task == "classification":
        _init_new_head(model, model_dir, swapped, dtype, device)
    fill_from_checkpoint(model, swapped, model_dir, device, dtype, progress=progress)
    return _finish(model, swapped, device, model_dir)


def _init_new_head(model: nn.Module, model_dir: Path, swapped: dict[str, str], dtype: torch.dtype,
                   device: torch.device) -> None:
    """A classification head that a causal checkpoint lacks starts as transformers initialises it
    (normal, std = initializer_range); it is trained in full beside LoRA."""
    expected = expected_shapes(model, swapped)
    prefix = getattr(model, "base_model_prefix", "model")
    present = {checkpoint_key_to_param(key, expected, prefix) for key in checkpoint_files(model_dir)}
    new = {name for name in expected if name not in present and name.rpartition(".")[0] not in swapped}
    std = getattr(model.config, "initializer_range", 0.02)
    for name in sorted(new):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = torch.zeros(expected[name], dtype=dtype, device=device)
        if attr == "weight":
            nn.init.normal_(value, std=std)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    model._qlora_new_params = new


def _finish(model: nn.Module, swapped: dict[str, str], device: torch.device, source: Path | None) -> nn.Module:
    model.to(device)  # buffers (rotary) were built on CPU
    model.requires_grad_(False)
    model.eval()
    model._qlora_swapped = swapped  # which linears are 4-bit, and which came from Conv1D
    model._qlora_source = str(source) if source is not None else None
    return model


def random_quantized(config: PretrainedConfig, *, compute_dtype: str | torch.dtype | None = None,
                     device: str | torch.device | None = None, seed: int = 0, progress: bool = True) -> nn.Module:
    """A randomly initialised model of any shape, built straight into NF4 on `device` one weight at a time:
    a 70B model never exists in bf16. Random weights time and size exactly like real ones."""
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    model = build_empty_model(config, compute_dtype=dtype)
    swapped = swap_in_nf4_linears(model, dtype)
    shapes = expected_shapes(model, swapped)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    for name in tqdm(list(shapes), desc="random NF4", unit="tensor", disable=not progress, leave=False):
        if not _is_meta(model, name):  # tied to a weight filled earlier
            continue
        value = _random_like(name, shapes[name], dtype, device, generator, std)
        _set_tensor(model, name, value, swapped, device, dtype)
    _tie_and_check_missing(model, shapes, {n for n in shapes if not _is_meta(model, n)}, Path("<random>"))
    return _finish(model, swapped, device, None)


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
    return param is None or param.device.type == "meta"


def model_summary(model: nn.Module) -> str:
    """A short human summary: architecture, which layers are 4-bit, and the bytes they take."""
    swapped = getattr(model, "_qlora_swapped", {})
    nf4_bytes = sum(quant.quantized_bytes(model.get_submodule(n)) for n in swapped)
    nf4_params = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in swapped)
    seen, other_bytes, other_params = set(), 0, 0
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] in swapped or id(p) in seen:
            continue
        seen.add(id(p))
        other_bytes += p.numel() * p.element_size()
        other_params += p.numel()
    kinds = sorted({n.rsplit(".", 1)[-1] for n in swapped})
    some = next(iter(swapped), None)
    compute = model.get_submodule(some).compute_dtype if some else None
    lines = [
        f"model:        {type(model).__name__} from {getattr(model, '_qlora_source', None) or 'random weights'}",
        f"4-bit NF4:    {len(swapped)} linear layers ({', '.join(kinds)}), {nf4_params / 1e6:.2f}M params, "
        f"{nf4_bytes / 2**20:.2f} MiB",
        f"full prec.:   {other_params / 1e6:.2f}M params (embeddings, norms, output layer), "
        f"{other_bytes / 2**20:.2f} MiB",
        f"compute:      {compute}, device {next(model.parameters()).device}",
    ]
    return "\n".join(lines)

