"""Adapter files in PEFT's layout, so PEFT, vLLM and TGI load what we train and we load what PEFT trains: written
from plain data (no model needed), and read back into an Adapter with every field and tensor checked.

    adapter/
        adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, ... (the keys PEFT writes)
        adapter_model.safetensors   base_model.model.<module path>.lora_A.weight (r, in), .lora_B.weight (out, r), fp32
        qlora_trainer.json          ours: a fingerprint of the base the adapter was trained on, the compute dtype

Our record lives in its own file, not in adapter_config.json: PEFT (0.21) does accept an unknown key there, but
only through its forward-compatibility fallback, which warns "Unexpected keyword arguments ... upgrade PEFT"
on every load; older PEFT releases without that fallback raise a TypeError instead. Loaders ignore other files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from qlora_trainer import __version__, atomic
from qlora_trainer.errors import ArgumentError, UserError
from qlora_trainer.lora import lora_scale, matches_target
from qlora_trainer.names import (ADAPTER_CONFIG_FILE, ADAPTER_RECORD_FILE, ADAPTER_WEIGHTS_FILE, ALL_LINEAR, CAUSAL_LM,
                                 CLASSIFICATION, DTYPE_NAMES, PEFT_TASK_TYPES)

PREFIX = "base_model.model."  # PEFT's path to the wrapped model: PeftModel.base_model (LoraModel).model

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))
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


def peft_config(*, base_model_name_or_path: str, r: int, alpha: float, dropout: float, use_rslora: bool,
                task_type: str, target_modules: list[str], fan_in_fan_out: bool,
                modules_to_save: list[str] | None = None) -> dict:
    """adapter_config.json as peft.LoraConfig(...).save_pretrained writes it (peft 0.21), all keys at PEFT's
    defaults except ours. peft_version is left out: PEFT fills it in on load, and we are not PEFT."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        # PEFT sets this for GPT-2's Conv1D (weights stored (in, out)); A/B are (r, in) / (out, r) either way.
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,  # what PeftModel.save_pretrained writes
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "target_parameters": None,
        "task_type": task_type,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": use_rslora,
        "velora_config": None,
    }


def adapter_record(*, compute_dtype: str | None, fingerprint: dict, classifier: dict | None = None) -> dict:
    """qlora_trainer.json (less the weights checksum, which write_adapter_files adds)."""
    record = {"version": __version__, "compute_dtype": compute_dtype, "base_fingerprint": fingerprint}
    if classifier is not None:
        record["classifier"] = classifier  # label names and pad id of a SEQ_CLS adapter
    return record


def write_adapter_files(folder: Path, weights: Factors, *, config: dict, extra: dict[str, torch.Tensor] | None = None,
                        record: dict | None = None) -> None:
    """An adapter in an existing folder: `config` as adapter_config.json; the factors and the fully trained tensors
    (`extra`, keyed by parameter name: modules_to_save) as adapter_model.safetensors in fp32; `record` (see
    adapter_record; None for none) as qlora_trainer.json with the checksum of the weights file."""
    tensors = {}
    for name, (A, B) in weights.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _to_saved(A)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _to_saved(B)
    for name, value in (extra or {}).items():
        tensors[PREFIX + name] = _to_saved(value)
    safetensors.torch.save_file(tensors, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    _write_json(folder / ADAPTER_CONFIG_FILE, config)
    if record is not None:
        # safetensors has no checksum of its own: a flipped bit in a weight would load silently
        record = {**record, "weights_sha256": atomic.file_sha256(folder / ADAPTER_WEIGHTS_FILE)}
        _write_json(folder / ADAPTER_RECORD_FILE, record)


def _to_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
            if not matches_targets(module, targets):
                raise UserError(f"{file}: has LoRA weights for {module}, which target_modules {targets} does not "
                                f"name: the adapter's files do not belong together")
            halves.setdefault(module, {})[half] = tensor
        elif matches_any(name.rpartition(".")[0], to_save):
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
            if not any(matches_targets(m, [target]) for m in weights):
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


def matches_targets(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex must match the whole path; a list entry matches the path or its last parts."""
    if isinstance(targets, str):
        return targets == ALL_LINEAR or re.fullmatch(targets, module) is not None
    return matches_any(module, targets)


def matches_any(module: str, names: list[str]) -> bool:
    return any(matches_target(module, n) for n in names)
