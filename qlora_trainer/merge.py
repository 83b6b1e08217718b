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

import argparse
import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora_trainer import atomic, quant
from qlora_trainer.adapter import (Adapter, check_base_fingerprint, load_adapter_into, read_adapter,
                                   verify_weights_checksum)
from qlora_trainer.classify import num_labels_of_adapter, write_merged_config
from qlora_trainer.errors import UserError
from qlora_trainer.shards import ShardWriter, header_entries, itemsize, parse_size, shard_name
from qlora_trainer.loading import (DTYPES, checkpoint_key_to_param, expected_shapes, return_freed_memory_to_os,
                                   build_empty_model, checkpoint_files, is_other_task_head, read_config,
                                   resolve_model_dir, stream_tensors, swap_in_nf4_linears)

INTO = ("dequantized", "original")
DEFAULT_SHARD_SIZE = "5GB"
# When the adapter does not record the compute dtype it was trained with, assume the GPU default (bf16).
ASSUMED_COMPUTE_DTYPE = "bf16"
INDEX_FILE = "model.safetensors.index.json"
# Files copied from the base folder as they are: generation defaults, tokenizer and chat template.
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
          "chat_template.json")
COPIED_GLOBS = ("*.tiktoken", "additional_chat_templates/*")

_CONFIG_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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
    if into not in INTO:
        raise ValueError(f"into must be one of {INTO}, got {into!r}")
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

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.out_dtype)


def _plan(model_dir: Path, adapter: Adapter, adapter_dir: Path, out_dtype: torch.dtype | None,
          compute_dtype: torch.dtype) -> tuple[list[_Entry], object]:
    config = read_config(model_dir)
    check_base_fingerprint(adapter, copy.deepcopy(config))
    classifier = adapter.config.get("task_type") == "SEQ_CLS"  # the head comes from the adapter; lm_head is dropped
    model = build_empty_model(config, compute_dtype=compute_dtype, task="classification" if classifier else "causal_lm",
                              num_labels=num_labels_of_adapter(adapter) if classifier else None)  # meta: shapes only
    swapped = swap_in_nf4_linears(model, compute_dtype)
    expected = expected_shapes(model, swapped)
    prefix = getattr(model, "base_model_prefix", "model")
    files = checkpoint_files(model_dir)
    headers = header_entries(files)

    entries, by_param = [], {}
    by_file: dict[Path, list[str]] = {}  # shard by shard, in the order stream_tensors reads them
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for key, file in ((k, f) for f, keys in by_file.items() for k in keys):
        if classifier and is_other_task_head(model, key):
            continue
        shape, dtype = headers[key]
        param = checkpoint_key_to_param(key, expected, prefix)
        target = out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype
        entry = _Entry(key, file, shape, target, param)
        entries.append(entry)
        if param is not None:
            by_param[param] = entry

    adapter_file = adapter_dir / "adapter_model.safetensors"
    for module_name, (A, B) in adapter.weights.items():
        param = module_name + ".weight"
        entry = by_param.get(param)
        if entry is None:
            tied = {t for t in model.get_expanded_tied_weights_keys(all_submodels=True)}
            why = "it is tied to another weight the checkpoint stores once" if param in tied else \
                "the base model has no such layer"
            raise UserError(f"{adapter_file}: adapter has a LoRA update for {module_name!r}, but {why}: "
                            f"this adapter was trained on a different base than {model_dir}")
        out_features, in_features = entry.shape[::-1] if swapped.get(module_name) == "conv1d" else entry.shape
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape[0] != out_features \
                or A.shape[0] != B.shape[1]:
            raise UserError(f"{adapter_file}: LoRA shapes for {module_name!r} (A {tuple(A.shape)}, B {tuple(B.shape)}) "
                            f"do not fit the base weight {entry.key} {entry.shape}: this adapter was trained on a "
                            f"different base than {model_dir}")
        entry.lora = (A, B)
    for entry in entries:
        if entry.param is not None and entry.param.endswith(".weight"):
            module_name = entry.param.removesuffix(".weight")
            entry.quantized = module_name in swapped
            entry.conv1d = swapped.get(module_name) == "conv1d"

    for param, tensor in adapter.extra.items():  # tensors trained in full (modules_to_save): replace or add
        tensor_dtype = out_dtype or (by_param[param].out_dtype if param in by_param else tensor.dtype)
        if param in by_param:
            if tuple(tensor.shape) != by_param[param].shape:
                raise UserError(f"{adapter_file}: tensor {param!r} has shape {tuple(tensor.shape)}, but the base has "
                                f"{by_param[param].shape}: this adapter was trained on a different base")
            by_param[param].file, by_param[param].out_dtype = None, tensor_dtype
        else:
            entries.append(_Entry(param, None, tuple(tensor.shape), tensor_dtype, param))
    return entries, config


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

def _merged_tensors(entries: list[_Entry], adapter, into: str, compute_dtype: torch.dtype, progress: bool):
    """Yield (entry, output tensor) in checkpoint order, reading one base tensor at a time."""
    from_checkpoint = {e.key: e.file for e in entries if e.file is not None}
    by_key = {e.key: e for e in entries}
    stream = stream_tensors(from_checkpoint, torch.device("cpu"))
    bar = tqdm(total=len(entries), desc=f"merging ({into})", unit="tensor", disable=not progress, leave=False)
    for entry in entries:
        if entry.file is None:
            tensor = adapter.extra[entry.param]
        else:
            key, tensor, _ = next(stream)
            assert key == entry.key and by_key[key] is entry
            if entry.lora is not None:
                tensor = merge_weight(tensor, *entry.lora, adapter.scale, into=into, compute_dtype=compute_dtype,
                                      quantized=entry.quantized, conv1d=entry.conv1d)
            elif into == "dequantized" and entry.quantized:
                tensor = base_weight(tensor, into=into, compute_dtype=compute_dtype, quantized=True,
                                     conv1d=entry.conv1d)
            if not torch.isfinite(tensor).all() and tensor.is_floating_point():
                raise UserError(f"{entry.file}: merged tensor {entry.key!r} has NaN/inf values: "
                                "the adapter or the checkpoint is corrupt")
        yield entry, tensor.to(entry.out_dtype)
        del tensor
        return_freed_memory_to_os()
        bar.update(1)
    bar.close()


def _write_config(model_dir: Path, tmp: Path, out_dtype: torch.dtype | None) -> None:
    config_file = model_dir / "config.json"
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if out_dtype is not None:
        raw["dtype"] = _CONFIG_DTYPE_NAMES[out_dtype]
        if "torch_dtype" in raw:  # written by transformers 4.x
            raw["torch_dtype"] = raw["dtype"]
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


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
        raise UserError(f"{out}: --out exists and is a file: choose a new folder name")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: --out exists and is not empty: choose a new folder or remove it first")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: parent folder of --out does not exist")


# ---------------------------------------------------------------------------------------- public entry points

def _resolve_dtype(name: str | torch.dtype | None, flag: str) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"{flag} {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def adapter_compute_dtype(adapter: Adapter, adapter_dir: Path) -> str:
    """The compute dtype the adapter was trained with: recorded with it (ours), or `model.compute_dtype` of the
    run's config.yaml (runs/x/adapter, runs/x/checkpoints/step-N); else bf16, the GPU default."""
    if adapter.compute_dtype in DTYPES:  # recorded by save_adapter in qlora_trainer.json
        return adapter.compute_dtype
    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent.parent):
        if (run_dir / "config.yaml").is_file():
            import yaml

            try:
                run = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
                recorded = run["model"]["compute_dtype"]
            except (OSError, yaml.YAMLError, KeyError, TypeError):
                continue
            if recorded in DTYPES:
                return recorded
    return ASSUMED_COMPUTE_DTYPE


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
          dtype: str | torch.dtype | None = None, into: str = "dequantized",
          compute_dtype: str | torch.dtype | None = None, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
          progress: bool = True) -> Path:
    """Write base + adapter as a standard transformers model folder at `out`. Returns `out`.

    dtype: output dtype of floating tensors (default: each keeps the checkpoint's dtype).
    compute_dtype: the dtype training cast weights to before NF4 (default: recorded in the adapter, else bf16)."""
    if into not in INTO:
        raise UserError(f"--into {into!r}: use one of {', '.join(INTO)}")
    out = Path(out)
    _check_out(out)
    model_dir = resolve_model_dir(base)
    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no such adapter folder (adapter_config.json + adapter_model.safetensors)")
    read_config(model_dir)  # a config.json that is not JSON, or of an unknown architecture, is named here
    raw_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if raw_config.get("quantization_config"):
        raise UserError(f"{model_dir / 'config.json'}: this checkpoint is already quantized; merge needs the "
                        "full-precision base (the folder the adapter was trained from)")
    out_dtype = _resolve_dtype(dtype, "--dtype")
    adapter_obj = read_adapter(adapter_dir)
    task = adapter_obj.config.get("task_type") or "CAUSAL_LM"
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: task_type {task}: merge writes causal LMs and "
                        "classifiers (SEQ_CLS) only; use the base + adapter as they are")
    compute = _resolve_dtype(compute_dtype or adapter_compute_dtype(adapter_obj, adapter_dir), "--compute-dtype")
    entries, _ = _plan(model_dir, adapter_obj, adapter_dir, out_dtype, compute)
    verify_weights_checksum(adapter_obj)  # after the plan's checks, which name a wrong base or shape more precisely
    shards = _layout(entries, parse_size(max_shard_size))

    def write(tmp: Path) -> None:
        merged = _merged_tensors(entries, adapter_obj, into, compute, progress)
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
                writer.file.close()
                raise
            writer.close()
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries),
                              "total_parameters": sum(math.prod(e.shape) for e in entries)},
                 "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_config(model_dir, tmp, out_dtype)
        if task == "SEQ_CLS":
            write_merged_config(tmp / "config.json", adapter_obj)  # the classifier class, labels, pad id
        _copy_side_files(model_dir, tmp, adapter_dir)

    side_bytes = sum(f.stat().st_size for f in model_dir.iterdir() if f.name in COPIED and f.is_file())
    # an existing `out` is empty (checked above); a full disk is a UserError saying how much space is needed
    atomic.write_folder(out, write, expected_bytes=sum(e.nbytes for e in entries) + side_bytes)
    return out


def verify(base: str | os.PathLike, adapter: str | os.PathLike, merged: str | os.PathLike, *,
           texts: list[str] | None = None, device: str | None = None) -> dict:
    """Logits of quantized base + adapter vs the merged folder (plain transformers, fp32) on a few prompts.
    Returns {max_abs_diff, mean_abs_diff, top1_agreement, positions}."""
    from transformers import AutoModelForCausalLM

    from qlora_trainer.loading import load_quantized, resolve_device

    if read_adapter(adapter).config.get("task_type") == "SEQ_CLS":
        from qlora_trainer.classify import verify_merged_classifier

        return verify_merged_classifier(base, adapter, merged, texts=texts or VERIFY_TEXTS, device=device)
    dev = resolve_device(device)
    ours = load_quantized(base, compute_dtype="fp32", device=dev, progress=False)
    load_adapter_into(ours, adapter)
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(dev).eval()
    max_diff, total_diff, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in _verify_prompts(Path(merged), ours.config.vocab_size, texts):
            ids = ids.to(dev)[None]  # (1, T)
            a, b = ours(ids).logits.float()[0], ref(ids).logits.float()[0]  # (T, V)
            diff = (a - b).abs()
            max_diff = max(max_diff, diff.max().item())
            total_diff += diff.mean(-1).sum().item()
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += ids.shape[1]
    return {"max_abs_diff": max_diff, "mean_abs_diff": total_diff / positions, "top1_agreement": agree / positions,
            "positions": positions}


VERIFY_TEXTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
                "Once upon a time, in a small village by the sea,", "Question: what is 17 * 23? Answer:"]


def _verify_prompts(model_dir: Path, vocab_size: int, texts: list[str] | None) -> list[torch.Tensor]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:  # no tokenizer shipped: fixed random token ids
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (24,), generator=gen) for _ in range(4)]
    prompts = []
    for text in texts or VERIFY_TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        prompts.append(ids.clamp(max=vocab_size - 1))
    return prompts


# ---------------------------------------------------------------------------------------- CLI

def run_merge_command(args: argparse.Namespace) -> int:
    """`qlora-trainer merge` (flags in cli.py)."""
    out = merge(args.base, args.adapter, args.out, dtype=args.dtype, into=args.into, compute_dtype=args.compute_dtype,
                max_shard_size=args.max_shard_size, progress=not args.quiet)
    print(f"merged ({args.into}) into {out}")
    if args.verify:
        report = verify(args.base, args.adapter, out)
        print(f"verify: {report['positions']} positions, max |logit diff| {report['max_abs_diff']:.3g}, "
              f"mean {report['mean_abs_diff']:.3g}, top-1 agreement {100 * report['top1_agreement']:.1f}%")
    return 0

