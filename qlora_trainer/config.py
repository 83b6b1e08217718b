"""Run configuration: dataclasses for model, LoRA, data and training settings, loaded from YAML plus dotted
`key=value` overrides. Every check runs here, before anything heavy is loaded, and names the key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlora_trainer import atomic
from qlora_trainer.errors import UserError
from qlora_trainer.names import (ALL_LINEAR, ATTN_IMPLEMENTATIONS, CAUSAL_LM, CLASSIFICATION, COMPUTE_DTYPES,
                                 DATA_FORMATS, NO_TRACKER, OPTIMIZERS, SCHEDULES, TASKS,
                                 TRACKERS)
from qlora_trainer.paths import PATH_KEYS, resolve_path

REQUIRED_KEYS = ("model.path", "data.path", "out")
DEFAULT_MAX_STEPS = 1000


class ConfigError(UserError):
    """A bad value for one key; `key` is the dotted name. load_config adds the file name to the message."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def missing_key(key: str) -> ConfigError:
    return ConfigError(key, f"missing required key '{key}': set it in the file or pass {key}=...")


def _is_float_text(value: str) -> bool:
    # PyYAML reads `2e-4` (no dot) as a string: accept it where a float is expected.
    return re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()) is not None


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return "a list of strings, e.g. [q_proj, v_proj]"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return str(tp)


def _coerce(key: str, value, tp):
    """Return `value` as type `tp` (int where int, float accepts ints, bool, str, Optional, list[str]) or raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue  # try the next member of the union; the message below names them all
        raise ConfigError(key, f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise ConfigError(key, f"{key} must be a non-empty list of strings, e.g. [q_proj, v_proj], got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _is_float_text(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(key, f"{key} must be {_type_name(tp)}, got {value!r}")


class _Section:
    """Shared __post_init__: coerce every field to its annotated type, then run the section's value checks."""

    _section = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._section}.{f.name}" if self._section else f.name
            value = getattr(self, f.name)
            if value is None and key in REQUIRED_KEYS:
                raise missing_key(key)
            object.__setattr__(self, f.name, _coerce(key, value, hints[f.name]))
        self._check()

    def _check(self) -> None:
        pass

    def _need(self, name: str, ok: bool, what: str, example) -> None:
        if not ok:
            key = f"{self._section}.{name}"
            raise ConfigError(key, f"{key} must be {what}, got {getattr(self, name)!r}: set e.g. {key}={example}")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            key = f"{self._section}.{name}"
            raise ConfigError(key, f"{key} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class ModelConfig(_Section):
    path: str = None  # required: a local model folder or a hub id already in the local cache
    compute_dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    task: str = CAUSAL_LM
    num_labels: typing.Optional[int] = None  # classification only; else from the data
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto = sdpa where the architecture has it, else eager; or force one
    _section = "model"

    def _check(self):
        self._need("path", bool(self.path), "a model folder or hub id", "/models/llama3-8b")
        self._choice("compute_dtype", COMPUTE_DTYPES)
        self._choice("task", TASKS)
        self._choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        self._need("num_labels", self.num_labels is None or self.num_labels >= 2, "at least 2 (or null)", 2)


@dataclass
class LoraConfig(_Section):
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: typing.Union[str, typing.List[str]] = ALL_LINEAR  # "all-linear" or a list of module names
    use_rslora: bool = False
    _section = "lora"

    def _check(self):
        self._need("r", self.r > 0, "a positive integer", 16)
        self._need("alpha", self.alpha > 0, "positive", 32)
        self._need("dropout", 0 <= self.dropout < 1, "in [0, 1)", 0.05)
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            raise ConfigError("lora.targets", f"lora.targets must be '{ALL_LINEAR}' or a list of module names, "
                                              f"got {self.targets!r}: write lora.targets=[{self.targets}]")


@dataclass
class DataConfig(_Section):
    path: str = None  # required: jsonl/json/csv/parquet file, save_to_disk folder, or a cached hub dataset id
    format: str = "alpaca"
    max_seq_len: int = 2048
    packing: bool = False
    eval_fraction: float = 0.05
    eval_path: typing.Optional[str] = None
    train_on_prompt: bool = False
    cache_dir: typing.Optional[str] = None  # token cache; None: .qlora-cache beside the data
    num_proc: typing.Optional[int] = None  # tokenizing processes; None: the cores available
    streaming: bool = False  # read and tokenize rows while training, no full pass first
    _section = "data"

    def _check(self):
        self._need("path", bool(self.path), "a data file or folder", "data/train.jsonl")
        self._choice("format", DATA_FORMATS)
        self._need("max_seq_len", self.max_seq_len >= 8, "at least 8", 2048)
        self._need("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)", 0.05)
        self._need("num_proc", self.num_proc is None or self.num_proc >= 1, "a positive integer (or null)", 2)


@dataclass
class TrainConfig(_Section):
    max_steps: typing.Optional[int] = None  # DEFAULT_MAX_STEPS unless epochs is set; never both
    epochs: typing.Optional[float] = None  # passes over the training examples (after packing): sets the steps
    batch_size: int = 1
    grad_accum: int = 16
    lr: float = 2e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    optimizer: str = "paged_adamw_8bit"
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    save_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 3
    gradient_checkpointing: bool = True
    loss_chunk_size: int = 1024
    seed: int = 0
    max_bad_steps: int = 10
    report_to: typing.Union[str, typing.List[str]] = NO_TRACKER  # none, tensorboard, wandb, mlflow, or a list
    ddp_timeout: float = 1800.0  # seconds a process waits for the others (accelerate launch) before it gives up
    _section = "train"

    def _check(self):
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("train.epochs", f"train.max_steps ({self.max_steps}) and train.epochs ({self.epochs:g}) "
                                              f"are both set: set one, e.g. train.max_steps=null train.epochs="
                                              f"{self.epochs:g}")
        if self.epochs is not None:
            self._need("epochs", self.epochs > 0 and math.isfinite(self.epochs), "a positive number", 1)
        elif self.max_steps is None:
            self.max_steps = DEFAULT_MAX_STEPS
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "eval_every", "log_every",
                     "keep_checkpoints", "loss_chunk_size", "max_bad_steps"):
            if name == "max_steps" and self.max_steps is None:
                continue  # derived from epochs when the data is known (train.Run)
            self._need(name, getattr(self, name) >= 1, "at least 1", {"loss_chunk_size": 1024}.get(name, 1))
        self._need("lr", self.lr > 0, "positive", 2.0e-4)
        self._need("warmup_steps", self.warmup_steps >= 0, "0 or more", 10)
        self._choice("schedule", SCHEDULES)
        self._choice("optimizer", OPTIMIZERS)
        self._need("weight_decay", self.weight_decay >= 0, "0 or more", 0.0)
        self._need("max_grad_norm", self.max_grad_norm > 0, "positive", 0.3)
        self._need("seed", self.seed >= 0, "0 or more", 0)
        self._need("ddp_timeout", self.ddp_timeout > 0 and math.isfinite(self.ddp_timeout), "positive seconds", 1800)
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        for name in names:
            if name not in TRACKERS:
                raise ConfigError("train.report_to", f"train.report_to must be one of {', '.join(TRACKERS)} (or a "
                                                     f"list of them), got {name!r}")
        if NO_TRACKER in names and len(names) > 1:
            raise ConfigError("train.report_to", f"train.report_to lists {NO_TRACKER} with other trackers "
                                                 f"{names}: drop {NO_TRACKER}")

    @property
    def trackers(self) -> list[str]:
        """train.report_to as a list of tracker names, without repeats ([] for none)."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return [n for i, n in enumerate(names) if n != NO_TRACKER and n not in names[:i]]


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    model: ModelConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = None
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = None  # output folder: adapter/, checkpoints/, metrics.jsonl, config.yaml
    resume: bool = False

    def __post_init__(self):
        if self.data is None:
            raise missing_key("data.path")
        if not self.out:
            raise ConfigError("out", "missing required key 'out' (the run folder): set it or pass out=runs/NAME")
        self.out = _coerce("out", self.out, str)
        self.resume = _coerce("resume", self.resume, bool)
        if (self.model.task == CLASSIFICATION) != (self.data.format == CLASSIFICATION):
            wanted = CLASSIFICATION if self.model.task == CLASSIFICATION else "text, alpaca, completion or chat"
            raise ConfigError("data.format", f"model.task {self.model.task} needs data.format {wanted}, "
                                             f"got {self.data.format}: make the two agree")


def valid_keys() -> list[str]:
    keys = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return keys + ["out", "resume"]


# Names users bring from other tools (PEFT, HF Trainer) -> ours.
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
            "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "schedule",
            "per_device_train_batch_size": "batch_size", "warmup": "warmup_steps", "optim": "optimizer",
            "model_name_or_path": "path", "max_length": "max_seq_len", "seq_len": "max_seq_len",
            "output_dir": "out", "dtype": "compute_dtype", "torch_dtype": "compute_dtype"}


def closest_key(key: str) -> str | None:
    """The valid dotted key the user most likely meant, or None."""
    keys = valid_keys()
    leaf = key.rsplit(".", 1)[-1]
    leaf = _ALIASES.get(leaf, leaf)
    same_leaf = [k for k in keys if k == leaf or k.endswith("." + leaf)]
    if same_leaf:  # right name, wrong place (`lr:` at the top level) or a known alias
        section = key.split(".")[0]
        return next((k for k in same_leaf if k.startswith(section + ".")), same_leaf[0])
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(key: str, where: str) -> UserError:
    close = closest_key(key)
    hint = f"did you mean '{close}'?" if close else f"valid keys are {', '.join(valid_keys())}"
    return UserError(f"unknown key '{key}' in {where}: {hint}")


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found: pass the path to a YAML file such as configs/tiny.yaml")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: invalid YAML ({problem}): fix the syntax there") from err
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys (model:, lora:, data:, train:, out:), "
                        f"got {type(raw).__name__}")
    return raw


def _flatten(raw: dict, path: str) -> dict[str, object]:
    """{'lora': {'r': 8}, 'out': 'x'} -> {'lora.r': 8, 'out': 'x'}, rejecting unknown keys and bad sections."""
    flat = {}
    for top, value in raw.items():
        top = str(top)
        if top in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"'{top}' in {path} must be a mapping of keys (e.g. {top}: {{...}}), got {value!r}")
            for sub, v in value.items():
                key = f"{top}.{sub}"
                if key not in valid_keys():
                    raise _unknown_key(key, path)
                flat[key] = v
        elif top in ("out", "resume"):
            flat[top] = value
        elif isinstance(value, dict) and difflib.get_close_matches(top, list(SECTIONS), n=1, cutoff=0.6):
            section = difflib.get_close_matches(top, list(SECTIONS), n=1, cutoff=0.6)[0]
            raise UserError(f"unknown key '{top}' in {path}: did you mean '{section}'?")
        else:
            raise _unknown_key(top, path)
    return flat


def parse_override(text: str) -> tuple[str, object]:
    """'lora.r=32' -> ('lora.r', 32): the value is read with YAML rules (true, 2.0e-4, [a, b], null)."""
    if "=" not in text:
        raise UserError(f"override '{text}' has no '=': write it as key=value, e.g. lora.r=32")
    key, value_text = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"override '{text}': value is not valid YAML: quote it, e.g. {key}='...'") from err
    return key, value


def build_config(flat: dict[str, object], where: str = "the config") -> RunConfig:
    """Dotted keys -> validated RunConfig. `where` names the source in messages."""
    tree: dict = {}
    for key, value in flat.items():
        if key not in valid_keys():
            raise _unknown_key(key, where)
        parts = key.split(".")
        if len(parts) == 1:
            tree[key] = value
        else:
            tree.setdefault(parts[0], {})[parts[1]] = value
    try:
        sections = {name: cls(**tree.get(name, {})) for name, cls in SECTIONS.items()
                    if name in tree or name in ("lora", "train")}
        for required in ("model", "data"):
            if required not in sections:
                raise missing_key(f"{required}.path")
        return RunConfig(**sections, out=tree.get("out"), resume=tree.get("resume", False))
    except ConfigError as err:
        raise UserError(f"{where}: {err.message}") from err


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file + dotted `key=value` overrides -> a validated RunConfig (UserError naming file, key and fix).

    Paths (model.path, data.path, data.eval_path, out) come back absolute: those in the file resolve against the
    file's folder, those in overrides against the current directory; a hub id (org/name) that is not a path
    there stays as given."""
    config_dir = os.path.dirname(os.path.abspath(path))
    flat = {key: resolve_path(key, value, config_dir) for key, value in _flatten(_read_yaml(path), path).items()}
    from_override = set()
    for text in overrides:
        key, value = parse_override(text)
        if key in SECTIONS and isinstance(value, dict):  # model={path: x} is allowed too
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = resolve_path(f"{key}.{sub}", v, os.getcwd())
                from_override.add(f"{key}.{sub}")
            continue
        if key not in valid_keys():
            raise _unknown_key(key, f"override '{text}'")
        flat[key] = resolve_path(key, value, os.getcwd())
        from_override.add(key)
    try:
        return build_config(flat, where=path)
    except UserError as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError) and cause.key in from_override:
            raise UserError(f"{path} (override {cause.key}=...): {cause.message}") from cause
        raise


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (defaults + file + overrides) as YAML, atomically, with absolute paths (a
    relative one is taken against the current directory), so that load_config reads it back to an equal RunConfig
    from any directory."""
    tree = config_to_dict(cfg)
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = tree[section] if section else tree
        holder[name] = resolve_path(key, holder[name], os.getcwd())
    atomic.write_text(Path(path), yaml.safe_dump(tree, sort_keys=False, default_flow_style=False))
