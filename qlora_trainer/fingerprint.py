"""Which base model an adapter belongs to: a fingerprint recorded with the adapter and checked on load.

An adapter loaded over another base computes garbage without any error; the fingerprint (architecture, the
config fields that fix shapes and compute, their hash, and the shape of every linear LoRA may wrap) turns that
into a clear message naming what differs.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from qlora_trainer.expert_lora import expert_parameters
from qlora_trainer.lora import linear_module_names, linear_shape, lora_modules

FINGERPRINT_FORMAT = 1

# Config fields that say which base this is: shapes, and what the layers compute. Not dtype, paths, versions,
# max_position_embeddings (context-extended copies of a base are the same base) or generation settings.
FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "rms_norm_eps", "layer_norm_eps",
    "rope_parameters", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "sliding_window", "n_embd", "n_layer", "n_head", "n_inner", "activation_function", "layer_norm_epsilon",
)


def base_fingerprint(model: nn.Module) -> dict:
    """What identifies a base for an adapter: architecture, the config fields that fix shapes and compute
    (with a hash of them), the (out, in) shape of every linear layer LoRA may wrap and the (experts, out, in) of every
    expert weight. `model` may carry LoRA layers, be a causal LM or a classifier of the same base, or be built on the
    meta device."""
    config = model.config
    raw = config.to_dict()
    fields = {key: raw[key] for key in FINGERPRINT_FIELDS if key in raw}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return {
        "format": FINGERPRINT_FORMAT,
        "architecture": config.model_type,
        "config": fields,
        "config_hash": hashlib.sha256(canonical.encode()).hexdigest(),
        "modules": {name: list(shape) for name, shape in sorted({**linear_shapes(model),
                                                                 **expert_parameters(model)}.items())},
    }


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of every linear LoRA may wrap; a wrapped layer counts under its own path."""
    wrapped = lora_modules(model)
    shapes = {name: linear_shape(layer) for name, layer in wrapped.items()}
    for name in linear_module_names(model):
        parent, _, last = name.rpartition(".")
        if not (last == "base" and parent in wrapped):
            shapes[name] = linear_shape(model.get_submodule(name))
    return dict(sorted(shapes.items()))


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between the base an adapter was trained on and this one ([] if the same)."""
    diffs = []
    if saved.get("architecture") != current["architecture"]:
        diffs.append(f"architecture {saved.get('architecture')} (adapter) vs {current['architecture']} (this base)")
    saved_config = saved.get("config", {})
    if saved.get("config_hash") != current["config_hash"]:
        # Compare field by field: a field only one side has is a transformers-version difference, not a
        # different model.
        for key in sorted(set(saved_config) & set(current["config"])):
            if saved_config[key] != current["config"][key]:
                diffs.append(f"{key}={saved_config[key]!r} (adapter) vs {current['config'][key]!r} (this base)")
    saved_modules, modules = saved.get("modules", {}), current["modules"]
    missing = [m for m in saved_modules if m not in modules]
    if missing:
        diffs.append(f"{len(missing)} linear layer(s) missing from this base, e.g. {missing[0]}")
    for name, shape in saved_modules.items():
        if name in modules and list(shape) != list(modules[name]):
            layout = "(experts, out, in)" if len(shape) == 3 else "(out, in)"
            diffs.append(f"{name} is {tuple(shape)} {layout} in the adapter's base vs {tuple(modules[name])} here")
            break
    return diffs
