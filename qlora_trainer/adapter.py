"""Adapters in PEFT's layout: read and check one (ours or PEFT's), load it into a model, save a model's LoRA layers.

The files themselves are written by peft_layout.py from plain data. Every read is validated, and every problem
is a UserError naming the file. A folder is written into a temporary sibling, every file fsynced, then renamed
into place: an adapter folder that exists is complete, and an older adapter at the same path survives any
failure while writing.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_trainer import atomic
from qlora_trainer.errors import ArgumentError, UserError
from qlora_trainer.fingerprint import base_fingerprint, fingerprint_differences, linear_shapes
from qlora_trainer.lora import apply_lora, lora_modules, lora_scale, matches_target
from qlora_trainer.names import (ADAPTER_CONFIG_FILE, ADAPTER_RECORD_FILE, ADAPTER_WEIGHTS_FILE, ALL_LINEAR,
                                 DTYPE_NAMES, PEFT_TASK_TYPES, CAUSAL_LM, CLASSIFICATION, dtype_name)
from qlora_trainer.peft_layout import PREFIX, Factors, adapter_record, peft_config, write_adapter_files

SEQ_CLS = PEFT_TASK_TYPES[CLASSIFICATION]


@dataclass
class Adapter:
    config: dict  # the adapter_config.json content
    weights: Factors  # module path -> (A (r, in), B (out, r)), fp32
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    extra: dict[str, torch.Tensor]  # modules_to_save tensors keyed by our parameter name; {} for a causal LM
    fingerprint: dict | None = None  # the base it was trained on (qlora_trainer.json); None for PEFT's adapters
    compute_dtype: str | None = None  # "bf16" | "fp16" | "fp32": what the base was cast to before NF4 (ours only)
    path: Path | None = None
    classifier: dict | None = None  # SEQ_CLS (ours only): {"id2label": [names], "pad_token_id": int}
    weights_sha256: str | None = None  # of adapter_model.safetensors as saved (ours only): see verify_weights_checksum

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return self.config["lora_alpha"]

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def task(self) -> str:
        """Our task name: classification for PEFT's SEQ_CLS, else causal_lm."""
        return CLASSIFICATION if self.config.get("task_type") == SEQ_CLS else CAUSAL_LM

    def file(self, name: str) -> Path:
        """One of the adapter's files, for messages."""
        return self.path / name if self.path is not None else Path(name)


# ------------------------------------------------------------------------------------------ save

def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 task_type: str = PEFT_TASK_TYPES[CAUSAL_LM], modules_to_save: list[str] | None = None,
                 classifier: dict | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder, atomically (see write_model_adapter for the
    settings). An existing adapter at out_dir is replaced only once the new one is complete."""
    final = Path(out_dir)
    if final.exists() and not replaceable(final):
        raise UserError(f"{final}: exists and is not an adapter folder; refusing to replace it: "
                        "choose another output path or remove it")
    settings = dict(base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                    modules_to_save=modules_to_save, classifier=classifier)
    return atomic.write_folder(final, lambda folder: write_model_adapter(model, folder, **settings))


def write_model_adapter(model: nn.Module, folder: Path, *, base_model_name_or_path: str,
                        task_type: str = PEFT_TASK_TYPES[CAUSAL_LM], modules_to_save: list[str] | None = None,
                        classifier: dict | None = None) -> None:
    """The model's LoRA layers (r, alpha, dropout and rsLoRA read from the layers), the parameters of the modules
    named in modules_to_save (a classifier's head), the base fingerprint and the compute dtype, as adapter files in
    an existing folder. `classifier`: the label names and pad id a SEQ_CLS adapter records."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save: call apply_lora first")
    settings = {(layer.r, layer.alpha, layer.dropout_p, layer.use_rslora) for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the LoRA layers differ in (r, alpha, dropout, use_rslora): {sorted(settings)}; "
                         "PEFT's layout holds one setting for all")
    (r, alpha, dropout, use_rslora), = settings
    config = peft_config(base_model_name_or_path=base_model_name_or_path, r=r, alpha=alpha, dropout=dropout,
                         use_rslora=use_rslora, task_type=task_type, modules_to_save=modules_to_save,
                         target_modules=_target_modules(model, list(layers)),
                         fan_in_fan_out=any(isinstance(layer.base, Conv1D) for layer in layers.values()))
    weights = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
    record = adapter_record(compute_dtype=_compute_dtype_name(model), fingerprint=base_fingerprint(model),
                            classifier=classifier)
    write_adapter_files(folder, weights, config=config, extra=_modules_to_save_state(model, modules_to_save),
                        record=record)


def replaceable(folder: Path) -> bool:
    """An adapter folder (or an empty one) that a new adapter may replace."""
    return folder.is_dir() and ((folder / ADAPTER_CONFIG_FILE).is_file() or not any(folder.iterdir()))


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """Short names ("q_proj") as PEFT writes them, sorted; a short name whose layers were only partly wrapped
    is written as the full paths instead, so that PEFT wraps exactly the layers we trained."""
    wrapped_set = set(wrapped)
    candidates = set(linear_shapes(model))
    targets = []
    for short in sorted({name.rsplit(".", 1)[-1] for name in wrapped}):
        every = {n for n in candidates if n.rsplit(".", 1)[-1] == short}
        if every <= wrapped_set:
            targets.append(short)
        else:
            targets.extend(sorted(n for n in wrapped if n.rsplit(".", 1)[-1] == short))
    return targets


def _modules_to_save_state(model: nn.Module, modules_to_save: list[str] | None) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of the fully trained modules (a classification head), as PEFT saves them."""
    state = {}
    for name, module in model.named_modules():
        if name and _matches_any(name, modules_to_save or []):
            for pname, param in module.named_parameters():
                state[f"{name}.{pname}"] = param
    return state


def _compute_dtype_name(model: nn.Module) -> str | None:
    """The dtype the base weights were cast to before NF4 (loading.py casts, then quantizes): merge needs it to
    reproduce the quantized weights training saw."""
    return dtype_name(model.get_input_embeddings().weight.dtype)


# ------------------------------------------------------------------------------------------ read

def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and validate an adapter folder (ours or PEFT's). Any problem is a UserError naming the file."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "no such folder"
        raise ArgumentError("adapter", f"{folder}: {what}: point {{arg}} at an adapter folder "
                                       f"({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE})")
    config = _read_config(folder / ADAPTER_CONFIG_FILE)
    weights, extra = _read_weights(folder / ADAPTER_WEIGHTS_FILE, config)
    ours = _read_ours(folder / ADAPTER_RECORD_FILE)
    return Adapter(config=config, weights=weights, scale=lora_scale(config["r"], config["lora_alpha"],
                                                                    config["use_rslora"]),
                   extra=extra, fingerprint=ours.get("base_fingerprint"), compute_dtype=ours.get("compute_dtype"),
                   path=folder, weights_sha256=ours.get("weights_sha256"), classifier=ours.get("classifier"))


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise UserError(f"{file}: missing: {what}")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file}: not valid JSON ({err}): the adapter is damaged; save or download it again") \
            from None
    if not isinstance(content, dict):
        raise UserError(f"{file}: expected a JSON object, found {type(content).__name__}")
    return content


def _read_config(file: Path) -> dict:
    config = _read_json(file, "not an adapter folder, or an incomplete copy of one")
    bad = lambda key, why: UserError(f"{file}: {key} {why}")  # noqa: E731
    if config.get("peft_type") != "LORA":
        raise bad("peft_type", f"is {config.get('peft_type')!r}: only LoRA adapters (peft_type LORA) are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad("r", f"is {r!r}: it must be a positive integer")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad("lora_alpha", f"is {alpha!r}: it must be a number")
    config["use_rslora"] = bool(config.get("use_rslora", False))
    dropout = config.setdefault("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise bad("lora_dropout", f"is {dropout!r}: it must be a number in [0, 1)")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                          and all(isinstance(t, str) for t in targets))):
        raise bad("target_modules", f"is {targets!r}: expected a list of module names or a regex")
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as err:
            raise bad("target_modules", f"is not a valid regex ({err})") from None
    unsupported = {
        "use_dora": config.get("use_dora"), "bias": config.get("bias", "none") != "none",
        "lora_bias": config.get("lora_bias"), "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"), "target_parameters": config.get("target_parameters"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "layer_replication": config.get("layer_replication"),
    }
    used = [key for key, value in unsupported.items() if value]
    if used:
        raise bad(", ".join(used), "is set: plain LoRA only (no DoRA, LoRA biases, per-module ranks or alphas, "
                                   "parameter targets, trainable tokens or layer replication)")
    return config


def _read_weights(file: Path, config: dict) -> tuple[dict, dict]:
    if not file.is_file():
        raise UserError(f"{file}: missing: the adapter folder is incomplete (only safetensors weights are read; "
                        "an adapter_model.bin pickle is not loaded because it can run code)")
    tensors = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"{file}: not a readable safetensors file ({err}): it is truncated or corrupt; "
                        "save or download the adapter again") from None

    r, targets, to_save = config["r"], config["target_modules"], config.get("modules_to_save") or []
    halves: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{file}: unexpected tensor {key!r}: PEFT adapter keys start with {PREFIX!r}")
        name = key[len(PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if match:
            module, half = match.groups()
            if not _matches_targets(module, targets):
                raise UserError(f"{file}: has LoRA weights for {module}, which target_modules {targets} does not "
                                f"name: the adapter's files do not belong together")
            halves.setdefault(module, {})[half] = tensor
        elif _matches_any(name.rpartition(".")[0], to_save):
            extra[name] = tensor
        else:
            raise UserError(f"{file}: unexpected tensor {key!r}: neither a LoRA weight nor in modules_to_save "
                            f"{to_save}")
    if not halves:
        raise UserError(f"{file}: holds no LoRA weights (*.lora_A.weight / *.lora_B.weight)")

    weights = {}
    for module in sorted(halves):
        pair = halves[module]
        for half in ("lora_A", "lora_B"):
            if half not in pair:
                raise UserError(f"{file}: {module} has no {half}.weight (key {PREFIX}{module}.{half}.weight): "
                                "the file is incomplete")
        A, B = (_checked(file, f"{PREFIX}{module}.{h}.weight", pair[h]) for h in ("lora_A", "lora_B"))
        if A.shape[0] != r or B.shape[1] != r:
            raise UserError(f"{file}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                            f"which is not rank r={r} from {ADAPTER_CONFIG_FILE}: the config and the weights disagree")
        weights[module] = (A, B)
    if isinstance(targets, list):
        for target in targets:
            if not any(_matches_targets(m, [target]) for m in weights):
                raise UserError(f"{file}: no LoRA weights for target module {target!r} named in {ADAPTER_CONFIG_FILE}: "
                                "the file is incomplete")
    extra = {name: _checked(file, PREFIX + name, t, matrix=False) for name, t in sorted(extra.items())}
    return weights, extra


def _checked(file: Path, key: str, tensor: torch.Tensor, matrix: bool = True) -> torch.Tensor:
    if matrix and tensor.dim() != 2:
        raise UserError(f"{file}: {key} has shape {tuple(tensor.shape)}, expected a matrix")
    if not tensor.is_floating_point():
        raise UserError(f"{file}: {key} has dtype {tensor.dtype}, expected floating point")
    tensor = tensor.to(torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise UserError(f"{file}: {key} holds NaN or inf values: the training that wrote it diverged")
    return tensor


def _read_ours(file: Path) -> dict:
    if not file.exists():
        return {}  # an adapter from PEFT or another tool
    ours = _read_json(file, "")
    fingerprint = ours.get("base_fingerprint")
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("modules", {}), dict) \
            or not isinstance(fingerprint.get("config", {}), dict):
        raise UserError(f"{file}: base_fingerprint is missing or malformed: delete {file.name} to load the adapter "
                        "without checking its base")
    if ours.get("compute_dtype") not in (None, *DTYPE_NAMES):
        raise UserError(f"{file}: compute_dtype is {ours['compute_dtype']!r}: expected bf16, fp16 or fp32")
    return ours


def _matches_targets(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex must match the whole path; a list entry matches the path or its last parts."""
    if isinstance(targets, str):
        return targets == ALL_LINEAR or re.fullmatch(targets, module) is not None
    return _matches_any(module, targets)


def _matches_any(module: str, names: list[str]) -> bool:
    return any(matches_target(module, n) for n in names)


# ------------------------------------------------------------------------------------------ check and load

def validate(model: nn.Module, adapter_dir: str | os.PathLike, *, check_base: bool = True) -> Adapter:
    """Read an adapter folder and check it fits `model` (a base from load_quantized): the task (a SEQ_CLS adapter
    goes on a classifier, any other on a causal LM), the base fingerprint (with check_base; adapters of ours only),
    every module's shapes (always: an adapter from PEFT has no fingerprint), then the weights' checksum. The first
    problem is a UserError naming the file and the module."""
    adapter = read_adapter(adapter_dir)
    _check_task(model, adapter)
    if check_base:
        check_base_fingerprint(adapter, model)
    _check_shapes(model, adapter)
    verify_weights_checksum(adapter)
    return adapter


def check_base_fingerprint(adapter: Adapter, model: nn.Module) -> None:
    """UserError if `adapter` (ours) was trained on a base other than `model` (loaded, or built on the meta
    device). Adapters without a fingerprint (PEFT's) pass: check their shapes instead."""
    if adapter.fingerprint is None:
        return
    diffs = fingerprint_differences(adapter.fingerprint, base_fingerprint(model))
    if diffs:
        raise UserError(f"{adapter.file(ADAPTER_RECORD_FILE)}: this adapter was trained on a different base model "
                        f"({adapter.config.get('base_model_name_or_path')}): {'; '.join(diffs)}. "
                        "Load it over the base it was trained on")


def verify_weights_checksum(adapter: Adapter) -> None:
    """UserError if adapter_model.safetensors is not the file our save wrote (a flipped bit in a weight parses
    fine and would load silently). Adapters without the record (PEFT's, older ones) pass. Called after the
    structural and shape checks, so that those name what is wrong when they can."""
    if adapter.weights_sha256 is None or adapter.path is None:
        return
    file = adapter.file(ADAPTER_WEIGHTS_FILE)
    if atomic.file_sha256(file) != adapter.weights_sha256:
        raise UserError(f"{file}: checksum mismatch with {ADAPTER_RECORD_FILE}: the weights are corrupt or were "
                        f"changed after they were saved; save or copy the adapter again (if you changed them on purpose, "
                        f"delete {ADAPTER_RECORD_FILE}, which also turns off the check of the base model)")


def load_adapter_into(model: nn.Module, adapter_dir: str | os.PathLike, *, check_base: bool = True) -> Adapter:
    """validate, then apply_lora with the adapter's r/alpha/dropout/targets on a model from load_quantized, and copy
    its weights in."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers: load the adapter into a fresh base model")
    adapter = validate(model, adapter_dir, check_base=check_base)
    apply_lora(model, list(adapter.weights), r=adapter.r, alpha=adapter.alpha,
               dropout=float(adapter.config["lora_dropout"]), use_rslora=adapter.use_rslora)
    copy_weights_into(model, adapter)
    return adapter


@torch.no_grad()
def copy_weights_into(model: nn.Module, adapter: Adapter) -> None:
    """Copy the adapter's A/B into the model's LoRA layers of the same paths, and its fully trained tensors
    (modules_to_save) into the parameters of the same names. The model's LoRA layers must be exactly the
    adapter's."""
    layers = lora_modules(model)
    if set(adapter.weights) != set(layers):
        raise ValueError(f"the adapter's LoRA modules ({len(adapter.weights)}) are not the model's ({len(layers)})")
    for name, (A, B) in adapter.weights.items():
        layers[name].lora_A.copy_(A)
        layers[name].lora_B.copy_(B)
    for name, value in adapter.extra.items():
        model.get_parameter(name).copy_(value)


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _check_task(model: nn.Module, adapter: Adapter) -> None:
    """A classification (SEQ_CLS) adapter goes on a classifier, any other on a causal LM."""
    file = adapter.file(ADAPTER_CONFIG_FILE)
    task = adapter.config.get("task_type")
    if task == SEQ_CLS and not _is_classifier(model):
        raise UserError(f"{file}: task_type SEQ_CLS: this is a classification adapter, not a causal LM's; "
                        "use `qlora-trainer classify --base ... --adapter ...` (generate needs a causal-LM adapter)")
    if _is_classifier(model) and task not in (None, SEQ_CLS):
        raise UserError(f"{file}: task_type {task}: not a classification adapter; load it on a causal LM "
                        "(model.task causal_lm), or train one with model.task classification")


def _check_shapes(model: nn.Module, adapter: Adapter) -> None:
    file = adapter.file(ADAPTER_WEIGHTS_FILE)
    shapes = linear_shapes(model)
    for name, (A, B) in adapter.weights.items():
        if name not in shapes:
            raise UserError(f"{file}: has LoRA weights for {name}, which this base model has no linear layer "
                            f"called: the adapter was made for a different model")
        out_f, in_f = shapes[name]
        if A.shape[1] != in_f or B.shape[0] != out_f:
            raise UserError(f"{file}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but this "
                            f"base's {name} is (out={out_f}, in={in_f}): the adapter was made for a different model")
    config = adapter.config
    if not (config.get("exclude_modules") or config.get("layers_to_transform")):
        # What PEFT would wrap on this base must all have weights (PEFT itself would leave them at B = 0).
        missing = [n for n in shapes if _matches_targets(n, config["target_modules"]) and n not in adapter.weights]
        if missing:
            raise UserError(f"{file}: no LoRA weights for {missing[0]} ({len(missing)} module(s) in all), which "
                            f"target_modules {config['target_modules']} names on this base: the file is incomplete "
                            "or the adapter was made for a different model")
    params = dict(model.named_parameters())
    for name, value in adapter.extra.items():
        if name not in params or params[name].shape != value.shape:
            have = tuple(params[name].shape) if name in params else "nothing"
            raise UserError(f"{file}: {PREFIX}{name} has shape {tuple(value.shape)}, but this model has {have} "
                            "there: was it loaded with the same task and num_labels?")
