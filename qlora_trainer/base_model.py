"""A Hugging Face model folder, resolved once: where it is, its config.json, and its safetensors tensors.

    BaseModel(path, config, raw_config, name)   what resolve_base returns and every command passes down
    checkpoint_files(path)                       {tensor name: shard file}, single-file or sharded (index.json)
    stream_tensors(files, device)                one tensor at a time, shard by shard

Nothing here downloads: a hub id must already be in the local Hugging Face cache. Nothing here runs code: only
safetensors are read, and a config.json that asks for the model's own Python code (auto_map) is refused unless
trust_remote_code is on.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from qlora_trainer.errors import UserError
from qlora_trainer.names import MODEL_CONFIG_FILE, MODEL_INDEX_FILE, MODEL_WEIGHTS_FILE
from qlora_trainer.paths import looks_like_hub_id


@dataclass(frozen=True)
class BaseModel:
    """A model folder resolved once and passed down, so no layer re-resolves the path or re-reads config.json."""

    path: Path  # the folder (a snapshot folder for a cached hub id)
    config: PretrainedConfig  # as transformers reads it; copy it (fresh_config) before changing it
    raw_config: dict  # config.json as JSON
    name: str  # what the user gave: a folder or a hub id (recorded as the adapter's base_model_name_or_path)
    trust_remote_code: bool = False

    def fresh_config(self) -> PretrainedConfig:
        """A copy of the config that building a model may change (num_labels, pad_token_id)."""
        return copy.deepcopy(self.config)


def resolve_base(path: str | os.PathLike | BaseModel, *, trust_remote_code: bool = False) -> BaseModel:
    """A local model folder or a cached hub id -> BaseModel (a BaseModel is returned as it is)."""
    if isinstance(path, BaseModel):
        return path
    model_dir = resolve_model_dir(path)
    raw = read_raw_config(model_dir)
    config = _auto_config(model_dir, raw, trust_remote_code)
    return BaseModel(model_dir, config, raw, str(path), trust_remote_code)


def prequantized_error(base: BaseModel, why: str) -> UserError:
    """The error for a checkpoint stored quantized in a format we cannot read back to full precision (`why`)."""
    return UserError(f"{base.path / MODEL_CONFIG_FILE}: this checkpoint is stored quantized (quantization_config "
                     f"{why}): use the model's bf16/fp16/fp32 release, which we quantize to NF4 ourselves")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local model folder, or a hub id that is already in the local cache (we never download)."""
    local = Path(path)
    if local.is_dir():
        if not (local / MODEL_CONFIG_FILE).is_file():
            raise UserError(f"{local}: no config.json in this folder: point model.path/--base at a Hugging Face "
                            "model folder")
        return local
    if local.exists():
        raise UserError(f"{local}: is a file, not a model folder (config.json + *.safetensors)")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not a valid repo id, or not in the cache: both mean "no such model here"
        if not looks_like_hub_id(str(path)):
            raise UserError(f"{path}: no such folder: point model.path/--base at a local model folder "
                            "(config.json + *.safetensors) or at a hub id (org/name) in the local Hugging Face "
                            "cache") from None
        raise UserError(
            f"{path}: no such folder, and not a model in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"nothing is downloaded at run time: download it first with `{download_command(str(path))}`"
        ) from None


def download_command(repo_id: str, *, dataset: bool = False) -> str:
    """The command line that puts `repo_id` (a model, or a dataset) into the local cache with the installed
    huggingface_hub: `hf download` (huggingface_hub >= 1.0 has only `hf`), or `huggingface-cli download` where only
    that one is installed."""
    from importlib import metadata

    try:
        scripts = {ep.name for ep in metadata.distribution("huggingface_hub").entry_points
                   if ep.group == "console_scripts"}
    except metadata.PackageNotFoundError:
        scripts = set()
    tool = "huggingface-cli" if "huggingface-cli" in scripts and "hf" not in scripts else "hf"
    return f"{tool} download {repo_id}" + (" --repo-type dataset" if dataset else "")


def read_raw_config(model_dir: Path) -> dict:
    """config.json as a JSON object (UserError naming the file otherwise)."""
    config_file = model_dir / MODEL_CONFIG_FILE
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file}: cannot read it as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object (model_type, hidden_size, ...), "
                        f"found a {type(raw).__name__}")
    return raw


def _auto_config(model_dir: Path, raw: dict, trust_remote_code: bool) -> PretrainedConfig:
    config_file = model_dir / MODEL_CONFIG_FILE
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


# ---------------------------------------------------------------------------------------- checkpoint files

def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: file} for a single-file or sharded (index.json) safetensors checkpoint."""
    index_file = model_dir / MODEL_INDEX_FILE
    single = model_dir / MODEL_WEIGHTS_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}, not a mapping")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index_file}: not a valid safetensors index ({err!r}): re-save the model") from None
        return {key: _shard_path(model_dir, shard, index_file) for key, shard in weight_map.items()}
    if single.is_file():
        return {key: single for key in _keys_in(single)}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise UserError(
            f"{model_dir}: only PyTorch pickle weights (*.bin/*.pt) here; we load safetensors only because "
            "pickles can run code. Convert with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json in this folder")


def by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    """{file: [tensor names]} in the order files and names first appear: the order tensors are streamed."""
    grouped: dict[Path, list[str]] = {}
    for key, file in files.items():
        grouped.setdefault(file, []).append(key)
    return grouped


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
    for file, keys in by_file(files).items():
        for key in keys:
            try:
                with safe_open(file, framework="pt", device=read_device) as f:
                    tensor = f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as err:
                raise UserError(f"{file}: cannot read tensor {key!r} ({err}): the file may be truncated or corrupt") \
                    from None
            yield key, tensor, file
