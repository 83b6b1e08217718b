"""Streaming merge: base checkpoint in, one tensor at a time, `W + scale * B @ A` out, as a standard model folder.

    merged/  config.json  generation_config.json  tokenizer files
             model-00001-of-0000M.safetensors ...  model.safetensors.index.json

Two ways to fold the update in (`into`):
  dequantized (default)  every weight the 4-bit base quantizes is rounded through NF4 exactly as loading does
                         (after a cast to the compute dtype training used), then the LoRA update is added in fp32:
                         the merged model computes what was trained. Weights loading keeps in full precision
                         (embeddings, norms, lm_head) are copied.
  original               the update is added to the unquantized checkpoint weights (fp32 sum).

Memory: the output layout (which tensor goes to which shard, every offset) is planned up front from the
safetensors headers, so each output shard's header is written first and tensors are then streamed into it as
they are merged. Peak host memory is about one tensor's worth of temporaries, whatever the model or shard size.
Everything is written into a temporary sibling folder that is renamed into place at the end; on failure it is
removed, so an output folder either is complete or does not exist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora_trainer import atomic, libc, quant, tasks
from qlora_trainer.adapter import Adapter, check_base_fingerprint, read_adapter, verify_weights_checksum
from qlora_trainer.base_model import (BaseModel, by_file, checkpoint_files, prequantized_error, resolve_base,
                                      stream_tensors)
from qlora_trainer.errors import ArgumentError, UserError
from qlora_trainer.expert_layout import CheckpointLayout, ExpertGroup, NotDequantizable
from qlora_trainer.expert_lora import expert_parameters, expert_update
from qlora_trainer.experts import expert_parameter_names
from qlora_trainer.loading import build_empty_model, expected_shapes, is_other_task_head, swap_in_nf4_linears
from qlora_trainer.merge_experts import ExpertDelta, merged_group, output_order
from qlora_trainer.names import (ADAPTER_CONFIG_FILE, ADAPTER_RECORD_FILE, ADAPTER_WEIGHTS_FILE, CONFIG_DTYPE_NAMES,
                                 DTYPE_NAMES, MERGE_INTO, MODEL_CONFIG_FILE, MODEL_INDEX_FILE, PEFT_TASK_TYPES,
                                 RUN_CONFIG_FILE, dtype_name, torch_dtype)
from qlora_trainer.paths import recorded_compute_dtype, run_config_file
from qlora_trainer.shards import ShardWriter, header_entries, itemsize, parse_size, shard_name
from qlora_trainer.tasks.base import Task

DEFAULT_SHARD_SIZE = "5GB"
# When neither the adapter nor the base's config.json says the compute dtype, assume the GPU default (bf16).
ASSUMED_COMPUTE_DTYPE = "bf16"
# Files copied from the base folder as they are: generation defaults, tokenizer and chat template.
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
          "chat_template.json")
COPIED_GLOBS = ("*.tiktoken", "additional_chat_templates/*")


# ---------------------------------------------------------------------------------------- the math (pure)

def merge_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, into: str = "dequantized",
                 compute_dtype: torch.dtype = torch.float32, quantized: bool = True,
                 conv1d: bool = False) -> torch.Tensor:
    """One merged weight in fp32, in the checkpoint's layout ((out, in); (in, out) for a GPT-2 Conv1D).

    `quantized`: whether loading stores this weight in NF4 (then `dequantized` rounds it the same way)."""
    w = base_weight(weight, into=into, compute_dtype=compute_dtype, quantized=quantized, conv1d=conv1d)
    # lora.delta_weight, computed in place: one (out, in) fp32 temporary fewer on a 70B-sized weight.
    merged = B.float() @ A.float()  # (out, in)
    merged.mul_(scale)
    if conv1d:
        return merged.T.add_(w).contiguous()  # Conv1D stores (in, out)
    return merged.add_(w)


def base_weight(weight: torch.Tensor, *, into: str, compute_dtype: torch.dtype, quantized: bool,
                conv1d: bool = False) -> torch.Tensor:
    """The base weight in fp32 as the merged model should see it, before any LoRA update."""
    if into not in MERGE_INTO:
        raise ValueError(f"into must be one of {MERGE_INTO}, got {into!r}")
    if into == "original" or not quantized:
        return weight.float()
    w = weight.T if conv1d else weight  # loading quantizes Conv1D weights as (out, in)
    w = quant.quantize_dequantize(w.to(compute_dtype).contiguous()).float()  # what the 4-bit base computes with
    return w.T.contiguous() if conv1d else w


# ---------------------------------------------------------------------------------------- planning

@dataclass
class _Entry:
    key: str               # tensor name in the checkpoint (and in the output)
    file: Path | None      # source shard (None: an adapter tensor the checkpoint lacks, e.g. a new head)
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    param: str | None      # model parameter name
    lora: tuple[torch.Tensor, torch.Tensor] | None = None
    quantized: bool = False
    conv1d: bool = False
    group: ExpertGroup | None = None  # a tensor of a fused expert parameter (merge_experts.py)
    expert_delta: ExpertDelta | None = None  # on a group's entries: the LoRA update of its experts, if any

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.out_dtype)


def _plan(base: BaseModel, adapter: Adapter, task: Task, out_dtype: torch.dtype | None,
          compute_dtype: torch.dtype) -> list[_Entry]:
    """Every output tensor in checkpoint order, with its source shard and the LoRA update it gets."""
    # The architecture on the meta device (shapes only), as the adapter's task builds it: a classifier's head comes
    # from the adapter, and the causal checkpoint's lm_head is dropped.
    model = build_empty_model(base.fresh_config(), compute_dtype=compute_dtype, **task.model_kwargs(adapter=adapter))
    check_base_fingerprint(adapter, model)
    swapped = swap_in_nf4_linears(model, compute_dtype)
    expected = expected_shapes(model, swapped)
    files = checkpoint_files(base.path)
    try:
        layout = CheckpointLayout(model, files, expected, expert_parameter_names(model),
                                  base.raw_config.get("quantization_config"))
    except NotDequantizable as err:
        raise prequantized_error(base, str(err)) from None
    headers = header_entries(files)

    entries, by_param = [], {}
    for file, keys in by_file(files).items():  # shard by shard, in the order stream_tensors reads them
        for key in keys:
            if is_other_task_head(model, key):
                continue
            shape, dtype = headers[key]
            param, group = layout.param_of(key), layout.group_of(key)
            if group is not None and group.dequantizes:  # written as the full-precision parameter, once
                if key != group.keys[0]:
                    continue
                key, shape, dtype = param, tuple(expected[param]), torch.bfloat16  # its quantizer's default
            target = out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype
            entry = _Entry(key, file, shape, target, param, group=group)
            entries.append(entry)
            if param is not None and entry.group is None:
                by_param[param] = entry

    adapter_file = adapter.file(ADAPTER_WEIGHTS_FILE)
    for module_name, (A, B) in adapter.weights.items():
        param = module_name + ".weight"
        entry = by_param.get(param)
        if entry is None:
            tied = {t for t in model.get_expanded_tied_weights_keys(all_submodels=True)}
            why = "it is tied to another weight the checkpoint stores once" if param in tied else \
                "the base model has no such layer"
            raise UserError(f"{adapter_file}: adapter has a LoRA update for {module_name!r}, but {why}: "
                            f"this adapter was trained on a different base than {base.path}")
        out_features, in_features = entry.shape[::-1] if swapped.get(module_name) == "conv1d" else entry.shape
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape[0] != out_features \
                or A.shape[0] != B.shape[1]:
            raise UserError(f"{adapter_file}: LoRA shapes for {module_name!r} (A {tuple(A.shape)}, B {tuple(B.shape)}) "
                            f"do not fit the base weight {entry.key} {entry.shape}: this adapter was trained on a "
                            f"different base than {base.path}")
        entry.lora = (A, B)
    _attach_expert_updates(model, adapter, layout, entries, base)
    for entry in entries:
        if entry.param is not None and entry.param.endswith(".weight"):
            module_name = entry.param.removesuffix(".weight")
            entry.quantized = module_name in swapped
            entry.conv1d = swapped.get(module_name) == "conv1d"

    for param, tensor in adapter.extra.items():  # tensors trained in full (modules_to_save): replace or add
        tensor_dtype = out_dtype or (by_param[param].out_dtype if param in by_param else tensor.dtype)
        if param in layout.groups:
            raise UserError(f"{adapter_file}: adapter replaces the expert weight {param!r} in full, which merge "
                            "cannot write back into the checkpoint's expert layout")
        if param in by_param:
            if tuple(tensor.shape) != by_param[param].shape:
                raise UserError(f"{adapter_file}: tensor {param!r} has shape {tuple(tensor.shape)}, but the base has "
                                f"{by_param[param].shape}: this adapter was trained on a different base")
            by_param[param].file, by_param[param].out_dtype = None, tensor_dtype
        else:
            entries.append(_Entry(param, None, tuple(tensor.shape), tensor_dtype, param))
    return output_order(entries)


def _attach_expert_updates(model, adapter: Adapter, layout: CheckpointLayout, entries: list[_Entry],
                           base: BaseModel) -> None:
    """Give the entries of each expert weight the adapter updates their LoRA update (one expert at a time, in the
    parameter's stored orientation), the factors checked against the weight's shape first."""
    shapes = expert_parameters(model)
    adapter_file = adapter.file(ADAPTER_WEIGHTS_FILE)
    for path, (A, B) in adapter.experts.items():
        if path not in shapes or path not in layout.groups:
            raise UserError(f"{adapter_file}: adapter has a LoRA update for the expert weight {path!r}, but the base "
                            f"model has no such weight: this adapter was trained on a different base than {base.path}")
        experts, out_features, in_features = shapes[path]
        if A.shape != (adapter.r * experts, in_features) or B.shape != (out_features, adapter.r * experts):
            raise UserError(f"{adapter_file}: LoRA shapes for {path!r} (A {tuple(A.shape)}, B {tuple(B.shape)}) do not "
                            f"fit the base weight's {experts} experts of ({out_features}, {in_features}): this adapter "
                            f"was trained on a different base than {base.path}")
        update = expert_update(A, B, adapter.scale, num_experts=experts,
                               transposed=bool(model.get_submodule(path.rpartition(".")[0]).is_transposed))
        for entry in entries:
            if entry.group is not None and entry.group.param == path:
                entry.expert_delta = update


def _layout(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Greedy shards in checkpoint order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


# ---------------------------------------------------------------------------------------- writing

def _merged_tensors(entries: list[_Entry], base_dir: Path, adapter, into: str, compute_dtype: torch.dtype,
                    progress: bool):
    """Yield (entry, output tensor) in checkpoint order, reading one base tensor at a time."""
    files = checkpoint_files(base_dir)
    wanted = {k for e in entries if e.file is not None for k in (e.group.keys if e.group is not None else [e.key])}
    stream = stream_tensors({k: f for k, f in files.items() if k in wanted}, torch.device("cpu"))
    read: dict[str, torch.Tensor] = {}  # tensors of a fused expert parameter, until its last one is read

    def tensor_of(key: str) -> torch.Tensor:
        while key not in read:
            name, tensor, _ = next(stream)
            read[name] = tensor
        return read.pop(key)

    experts_out: dict[str, torch.Tensor] = {}  # the merged tensors of the current expert group, by checkpoint key
    bar = tqdm(total=len(entries), desc=f"merging ({into})", unit="tensor", disable=not progress, leave=False)
    for entry in entries:
        if entry.file is None:
            tensor = adapter.extra[entry.param]
        elif entry.group is not None:
            if entry.key not in experts_out:
                experts_out = merged_group(entry.group, {k: tensor_of(k) for k in entry.group.keys}, entry.file,
                                           into=into, compute_dtype=compute_dtype, delta=entry.expert_delta)
            tensor = experts_out.pop(entry.key)
            _check_finite(entry, tensor)
        else:
            tensor = tensor_of(entry.key)
            if entry.lora is not None:
                tensor = merge_weight(tensor, *entry.lora, adapter.scale, into=into, compute_dtype=compute_dtype,
                                      quantized=entry.quantized, conv1d=entry.conv1d)
            elif into == "dequantized" and entry.quantized:
                tensor = base_weight(tensor, into=into, compute_dtype=compute_dtype, quantized=True,
                                     conv1d=entry.conv1d)
            _check_finite(entry, tensor)
        yield entry, tensor.to(entry.out_dtype)
        del tensor
        libc.malloc_trim()
        bar.update(1)
    bar.close()


def _check_finite(entry: _Entry, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise UserError(f"{entry.file}: merged tensor {entry.key!r} has NaN/inf values: "
                        "the adapter or the checkpoint is corrupt")


def _merged_config(base: BaseModel, out_dtype: torch.dtype | None, task: Task, adapter: Adapter) -> dict:
    """config.json of the merged model: the base's, with the output dtype, as the adapter's task wants it."""
    raw = dict(base.raw_config)
    raw.pop("quantization_config", None)  # a base stored quantized (MXFP4) is written in full precision
    if out_dtype is not None:
        raw["dtype"] = CONFIG_DTYPE_NAMES[dtype_name(out_dtype)]
        if "torch_dtype" in raw:  # written by transformers 4.x
            raw["torch_dtype"] = raw["dtype"]
    return task.merged_config(raw, adapter)


def _copy_side_files(model_dir: Path, tmp: Path, adapter_dir: Path) -> None:
    names = {n for n in COPIED if (model_dir / n).is_file()}
    for pattern in COPIED_GLOBS:
        names |= {str(p.relative_to(model_dir)) for p in model_dir.glob(pattern) if p.is_file()}
    for name in sorted(names):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / name, tmp / name)  # follows hub-cache symlinks
    # A tokenizer saved next to the adapter (a chat template added in training) wins over the base's.
    for name in COPIED[1:]:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, tmp / name)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ArgumentError("out", f"{out}: {{arg}} exists and is a file: choose a new folder name")
    if out.is_dir() and any(out.iterdir()):
        raise ArgumentError("out", f"{out}: {{arg}} exists and is not empty: choose a new folder or remove it first")
    if not out.parent.is_dir():
        raise ArgumentError("out", f"{out.parent}: parent folder of {{arg}} does not exist")


def _dtype_argument(value: str | torch.dtype | None, argument: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPE_NAMES:
        raise ArgumentError(argument, f"{{arg}} {value!r}: use one of {', '.join(DTYPE_NAMES)}")
    return torch_dtype(value)


# ---------------------------------------------------------------------------------------- public entry points

@dataclass(frozen=True)
class ComputeDtype:
    """The compute dtype a merge uses for an adapter, and where it came from."""

    name: str  # bf16 | fp16 | fp32
    source: str  # where it came from, in words
    assumed: bool  # nothing recorded with the adapter says so: `merge` prints `assumed_line` naming --compute-dtype

    @property
    def assumed_line(self) -> str:
        return (f"merge: the adapter records no compute dtype (no {ADAPTER_RECORD_FILE}, no run {RUN_CONFIG_FILE}); "
                f"assumed {self.name}, {self.source}: if training cast the base to another dtype before NF4, "
                f"merge again with --compute-dtype {'|'.join(DTYPE_NAMES)}")


def adapter_compute_dtype(adapter: Adapter, adapter_dir: Path, base: BaseModel | None = None) -> ComputeDtype:
    """The compute dtype the adapter was trained with (what training cast the weights to before NF4), first found of:

    1. recorded with it (ours: qlora_trainer.json);
    2. `model.compute_dtype` of the run's config.yaml (runs/x/adapter, runs/x/checkpoints/step-N), unless `auto`;
    3. an assumption (`assumed`, which `merge` says in one line): PEFT's adapter_config.json records no dtype, so
       the base's config.json `dtype` (`torch_dtype` from transformers 4.x): transformers 5's from_pretrained loads
       in that dtype by default (dtype="auto") and quantizes from it, so a PEFT QLoRA run that passed no dtype
       trained on exactly these NF4 weights (fp32 for GPT-2 checkpoints; assuming bf16 there is a 6% logit error);
    4. with no dtype in the base's config.json either, bf16 (ASSUMED_COMPUTE_DTYPE), the GPU default."""
    if adapter.compute_dtype in DTYPE_NAMES:  # recorded by save_adapter in qlora_trainer.json
        return ComputeDtype(adapter.compute_dtype, f"recorded in {ADAPTER_RECORD_FILE}", assumed=False)
    run_file = run_config_file(adapter_dir)
    recorded = recorded_compute_dtype(run_file) if run_file is not None else None
    if recorded in DTYPE_NAMES:
        return ComputeDtype(recorded, f"model.compute_dtype of {run_file}", assumed=False)
    if base is not None:
        raw = base.raw_config
        config_dtype = raw.get("dtype") or raw.get("torch_dtype")
        name = {v: k for k, v in CONFIG_DTYPE_NAMES.items()}.get(config_dtype)
        if name is not None:
            return ComputeDtype(name, f"the dtype of the base's {MODEL_CONFIG_FILE} ({config_dtype}), which "
                                      "transformers loads and quantizes it in by default", assumed=True)
    return ComputeDtype(ASSUMED_COMPUTE_DTYPE, f"the GPU default (the base's {MODEL_CONFIG_FILE} names no dtype)",
                        assumed=True)


def merge(base: str | os.PathLike | BaseModel, adapter: str | os.PathLike, out: str | os.PathLike, *,
          dtype: str | torch.dtype | None = None, into: str = "dequantized",
          compute_dtype: str | torch.dtype | None = None, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
          progress: bool = True) -> Path:
    """Write base + adapter as a standard transformers model folder at `out`. Returns `out`.

    dtype: output dtype of floating tensors (default: each keeps the checkpoint's dtype).
    compute_dtype: the dtype training cast weights to before NF4 (default: adapter_compute_dtype's rule: recorded
    with the adapter or its run, else the base's config.json dtype, else bf16)."""
    if into not in MERGE_INTO:
        raise ArgumentError("into", f"{{arg}} {into!r}: use one of {', '.join(MERGE_INTO)}")
    out = Path(out)
    _check_out(out)
    base = resolve_base(base)  # a config.json that is not JSON, or of an unknown architecture, is named here
    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no such adapter folder ({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE})")
    out_dtype = _dtype_argument(dtype, "dtype")
    adapter_obj = read_adapter(adapter_dir)
    task_type = adapter_obj.config.get("task_type") or PEFT_TASK_TYPES["causal_lm"]
    if task_type not in PEFT_TASK_TYPES.values():
        raise UserError(f"{adapter_obj.file(ADAPTER_CONFIG_FILE)}: task_type {task_type}: merge writes causal LMs and "
                        "classifiers (SEQ_CLS) only; use the base + adapter as they are")
    task = tasks.for_adapter(adapter_obj)
    compute = _dtype_argument(compute_dtype or adapter_compute_dtype(adapter_obj, adapter_dir, base).name,
                              "compute_dtype")
    entries = _plan(base, adapter_obj, task, out_dtype, compute)
    verify_weights_checksum(adapter_obj)  # after the plan's checks, which name a wrong base or shape more precisely
    shards = _layout(entries, parse_size(max_shard_size))

    def write(tmp: Path) -> None:
        merged = _merged_tensors(entries, base.path, adapter_obj, into, compute, progress)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = shard_name(i, len(shards))
            writer = ShardWriter(tmp / name, [(e.key, e.shape, e.out_dtype) for e in shard])
            try:
                for _ in shard:
                    entry, tensor = next(merged)
                    writer.write(entry.key, tensor)
                    weight_map[entry.key] = name
            except BaseException:
                writer.abort()
                raise
            writer.close()
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries),
                              "total_parameters": sum(math.prod(e.shape) for e in entries)},
                 "weight_map": weight_map}
        (tmp / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config = _merged_config(base, out_dtype, task, adapter_obj)  # a classifier: its class, labels, pad id
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _copy_side_files(base.path, tmp, adapter_dir)

    side_bytes = sum(f.stat().st_size for f in base.path.iterdir() if f.name in COPIED and f.is_file())
    # an existing `out` is empty (checked above); a full disk is a UserError saying how much space is needed
    atomic.write_folder(out, write, expected_bytes=sum(e.nbytes for e in entries) + side_bytes)
    return out
