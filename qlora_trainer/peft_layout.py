"""Adapter files in PEFT's layout, written from plain data (no model needed), so PEFT, vLLM and TGI load them.

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
from pathlib import Path

import safetensors.torch
import torch

from qlora_trainer import __version__, atomic
from qlora_trainer.names import ADAPTER_CONFIG_FILE, ADAPTER_RECORD_FILE, ADAPTER_WEIGHTS_FILE

PREFIX = "base_model.model."  # PEFT's path to the wrapped model: PeftModel.base_model (LoraModel).model

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))


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
