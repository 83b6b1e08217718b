"""Adapter files in PEFT's layout, so PEFT, vLLM and TGI load what we train and we load what PEFT trains: written
from plain data (no model needed), and read back into an Adapter with every field and tensor checked.

    adapter/
        adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, target_parameters, ... (PEFT's keys)
        adapter_model.safetensors   base_model.model.<module path>.lora_A.weight (r, in), .lora_B.weight (out, r), fp32;
                                    an expert weight's (target_parameters): <experts module>[.base_layer].lora_A.weight
                                    (r*E, in), .lora_B.weight (out, r*E), nested as PEFT nests them (expert_lora.py)
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
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from qlora_trainer import __version__, atomic
from qlora_trainer.errors import ArgumentError, UserError
from qlora_trainer.lora import lora_scale, matches_target
from qlora_trainer.names import (ADAPTER_CONFIG_FILE, ADAPTER_RECORD_FILE, ADAPTER_WEIGHTS_FILE, ALL_LINEAR, CAUSAL_LM,
                                 CLASSIFICATION, DTYPE_NAMES, EXPERT_PROJECTIONS, PEFT_TASK_TYPES)

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
    experts: Factors = field(default_factory=dict)  # expert weight path -> (A (r*E, in), B (out, r*E)), fp32

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
                modules_to_save: list[str] | None = None, target_parameters: list[str] | None = None) -> dict:
    """adapter_config.json as peft.LoraConfig(...).save_pretrained writes it (peft 0.21), all keys at PEFT's
    defaults except ours. peft_version is left out: PEFT fills it in on load, and we are not PEFT. With
    target_parameters (LoRA on expert weights) target_modules may be [] (None would make PEFT pick its defaults)."""
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
        "target_parameters": target_parameters or None,
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
                        record: dict | None = None, experts: Factors | None = None) -> None:
    """An adapter in an existing folder: `config` as adapter_config.json; the factors (of linears: `weights`, of
    expert weights: `experts`) and the fully trained tensors (`extra`, keyed by parameter name: modules_to_save) as
    adapter_model.safetensors in fp32; `record` (see adapter_record; None for none) as qlora_trainer.json with the
    checksum of the weights file."""
    tensors = {}
    wrappers = expert_wrapper_paths(list(experts or {}))
    for name, (A, B) in [*weights.items(), *((wrappers[p], f) for p, f in (experts or {}).items())]:
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
    weights, extra, experts = _read_weights(folder / ADAPTER_WEIGHTS_FILE, config)
    ours = _read_ours(folder / ADAPTER_RECORD_FILE)
    return Adapter(config=config, weights=weights, scale=lora_scale(config["r"], config["lora_alpha"],
                                                                    config["use_rslora"]),
                   extra=extra, fingerprint=ours.get("base_fingerprint"), compute_dtype=ours.get("compute_dtype"),
                   path=folder, weights_sha256=ours.get("weights_sha256"), classifier=ours.get("classifier"),
                   experts=experts)


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
    parameters = config.get("target_parameters")
    if parameters is not None and not (isinstance(parameters, list) and all(isinstance(t, str) for t in parameters)):
        raise bad("target_parameters", f"is {parameters!r}: expected a list of parameter names")
    for target in parameters or []:
        if target.rpartition(".")[2] not in EXPERT_PROJECTIONS:
            raise bad("target_parameters", f"names {target!r}: only the expert weights of MoE layers "
                                           f"({', '.join(EXPERT_PROJECTIONS)}) are supported as parameter targets")
    config["target_parameters"] = parameters or None
    if parameters and config.get("target_modules") is None:
        config["target_modules"] = []  # LoRA on expert weights alone
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and (targets or parameters)
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
        "alpha_pattern": config.get("alpha_pattern"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "layer_replication": config.get("layer_replication"),
    }
    used = [key for key, value in unsupported.items() if value]
    if used:
        raise bad(", ".join(used), "is set: plain LoRA only (no DoRA, LoRA biases, per-module ranks or alphas, "
                                   "trainable tokens or layer replication)")
    return config


def _read_weights(file: Path, config: dict) -> tuple[Factors, dict, Factors]:
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
    parameters = config.get("target_parameters") or []
    halves: dict[str, dict[str, torch.Tensor]] = {}
    nested: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # experts module -> nesting depth -> half -> tensor
    extra = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{file}: unexpected tensor {key!r}: PEFT adapter keys start with {PREFIX!r}")
        name = key[len(PREFIX):]
        match = re.fullmatch(r"(.+?)((?:\.base_layer)*)\.(lora_A|lora_B)\.weight", name)
        if match:
            module, nesting, half = match.groups()
            if _hosts_targeted_parameters(module, parameters):
                nested.setdefault(module, {}).setdefault(nesting.count(".base_layer"), {})[half] = tensor
            elif not nesting and matches_targets(module, targets):
                halves.setdefault(module, {})[half] = tensor
            else:
                also = f" (nor target_parameters {parameters})" if parameters else ""
                raise UserError(f"{file}: has LoRA weights for {module + nesting}, which target_modules {targets} "
                                f"does not name{also}: the adapter's files do not belong together")
        elif matches_any(name.rpartition(".")[0], to_save):
            extra[name] = tensor
        else:
            raise UserError(f"{file}: unexpected tensor {key!r}: neither a LoRA weight nor in modules_to_save "
                            f"{to_save}")
    if not halves and not nested:
        raise UserError(f"{file}: holds no LoRA weights (*.lora_A.weight / *.lora_B.weight)")

    weights = {module: _factor_pair(file, module, halves[module], r, experts=False) for module in sorted(halves)}
    experts = {}
    for module, by_depth in sorted(nested.items()):
        for depth, path in _nested_parameter_paths(file, module, set(by_depth), parameters).items():
            experts[path] = _factor_pair(file, module + ".base_layer" * depth, by_depth[depth], r, experts=True)
    for what, names, found in (("module", targets, weights), ("parameter", parameters, experts)):
        for target in names if isinstance(names, list) else []:
            if not any(matches_targets(m, [target]) for m in found):
                raise UserError(f"{file}: no LoRA weights for target {what} {target!r} named in {ADAPTER_CONFIG_FILE}: "
                                "the file is incomplete")
    extra = {name: _checked(file, PREFIX + name, t, matrix=False) for name, t in sorted(extra.items())}
    return weights, extra, experts


def _factor_pair(file: Path, module: str, pair: dict[str, torch.Tensor], r: int, *,
                 experts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one wrapper, checked: A (r, in) and B (out, r), or for an expert weight A (r*E, in), B (out, r*E)."""
    for half in ("lora_A", "lora_B"):
        if half not in pair:
            raise UserError(f"{file}: {module} has no {half}.weight (key {PREFIX}{module}.{half}.weight): "
                            "the file is incomplete")
    A, B = (_checked(file, f"{PREFIX}{module}.{h}.weight", pair[h]) for h in ("lora_A", "lora_B"))
    rows = A.shape[0]
    fits = rows == B.shape[1] and rows % r == 0 if experts else rows == r and B.shape[1] == r
    if not fits:
        expected = f"r*experts rows with r={r}" if experts else f"rank r={r}"
        raise UserError(f"{file}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                        f"which is not {expected} from {ADAPTER_CONFIG_FILE}: the config and the weights disagree")
    return A, B


# ------------------------------------------------------------------------------------------ expert weights' nesting

def expert_wrapper_paths(paths: list[str]) -> dict[str, str]:
    """{expert weight path: the module path PEFT saves its factors under}. PEFT wraps each targeted parameter of a
    module in its own ParamWrapper, nested in the order the module registers them (EXPERT_PROJECTIONS' order), the
    last outermost: experts.gate_up_proj -> experts.base_layer, experts.down_proj -> experts."""
    by_module: dict[str, list[str]] = {}
    for path in paths:
        module, _, attr = path.rpartition(".")
        by_module.setdefault(module, []).append(attr)
    wrappers = {}
    for module, attrs in by_module.items():
        attrs.sort(key=EXPERT_PROJECTIONS.index)
        for i, attr in enumerate(attrs):
            wrappers[f"{module}.{attr}"] = module + ".base_layer" * (len(attrs) - 1 - i)
    return wrappers


def _hosts_targeted_parameters(module: str, parameters: list[str]) -> bool:
    return any(matches_any(f"{module}.{attr}", parameters) for attr in EXPERT_PROJECTIONS)


def _nested_parameter_paths(file: Path, module: str, depths: set[int], parameters: list[str]) -> dict[int, str]:
    """{nesting depth: expert weight path} of one experts module's wrappers, expert_wrapper_paths read backwards."""
    attrs = [a for a in EXPERT_PROJECTIONS if matches_any(f"{module}.{a}", parameters)]
    if depths != set(range(len(attrs))):
        raise UserError(f"{file}: {module} has LoRA weights nested {len(depths)} deep, but target_parameters "
                        f"{parameters} names {len(attrs)} of its expert weights ({', '.join(attrs)}): the adapter's "
                        "files do not belong together")
    return {len(attrs) - 1 - i: f"{module}.{attr}" for i, attr in enumerate(attrs)}


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
