"""Adapters and models: save a model's LoRA layers as an adapter, check that an adapter (ours or PEFT's) fits a
model, and load it into one. The files themselves are PEFT's layout (peft_layout.py: written from plain data, read
back with every field checked).

Every problem is a UserError naming the file and the module. A folder is written into a temporary sibling, every
file fsynced, then renamed into place: an adapter folder that exists is complete, and an older adapter at the same
path survives any failure while writing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_trainer import atomic
from qlora_trainer.errors import UserError
from qlora_trainer.expert_lora import expert_lora_modules, expert_parameters
from qlora_trainer.fingerprint import base_fingerprint, fingerprint_differences, linear_shapes
from qlora_trainer.lora import apply_lora, lora_modules
from qlora_trainer.names import (ADAPTER_CONFIG_FILE, ADAPTER_RECORD_FILE, ADAPTER_WEIGHTS_FILE, CAUSAL_LM,
                                 PEFT_TASK_TYPES, dtype_name)
from qlora_trainer.peft_layout import (PREFIX, SEQ_CLS, Adapter, adapter_record, matches_any, matches_targets,
                                       peft_config, read_adapter, write_adapter_files)

__all__ = ["Adapter", "read_adapter", "save_adapter", "write_model_adapter", "replaceable", "validate",
           "check_base_fingerprint", "verify_weights_checksum", "load_adapter_into", "copy_weights_into"]


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
    layers, experts = lora_modules(model), expert_lora_modules(model)
    if not layers and not experts:
        raise ValueError("the model has no LoRA layers to save: call apply_lora first")
    settings = {(layer.r, layer.alpha, layer.use_rslora) for layer in [*layers.values(), *experts.values()]}
    dropouts = {layer.dropout_p for layer in layers.values()}
    if len(settings) > 1 or len(dropouts) > 1:
        raise ValueError(f"the LoRA layers differ in (r, alpha, use_rslora): {sorted(settings)} or dropout "
                         f"{sorted(dropouts)}; PEFT's layout holds one setting for all")
    (r, alpha, use_rslora), = settings
    # PEFT refuses lora_dropout != 0 with target_parameters; the expert weights trained without it, the linears'
    # dropout only mattered in training (the run's config.yaml keeps it).
    dropout = 0.0 if experts else next(iter(dropouts))
    config = peft_config(base_model_name_or_path=base_model_name_or_path, r=r, alpha=alpha, dropout=dropout,
                         use_rslora=use_rslora, task_type=task_type, modules_to_save=modules_to_save,
                         target_modules=_target_modules(model, list(layers)),
                         target_parameters=_target_parameters(model, list(experts)),
                         fan_in_fan_out=any(isinstance(layer.base, Conv1D) for layer in layers.values()))
    weights = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
    record = adapter_record(compute_dtype=_compute_dtype_name(model), fingerprint=base_fingerprint(model),
                            classifier=classifier)
    write_adapter_files(folder, weights, config=config, extra=_modules_to_save_state(model, modules_to_save),
                        record=record, experts={name: (e.lora_A, e.lora_B) for name, e in experts.items()})


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


def _target_parameters(model: nn.Module, wrapped: list[str]) -> list[str]:
    """PEFT's target_parameters for the wrapped expert weights: "<module>.<parameter>" ("experts.gate_up_proj") where
    every expert weight of that name was wrapped, else the full paths; sorted."""
    every = list(expert_parameters(model))
    targets = []
    for short in sorted({".".join(name.rsplit(".", 2)[-2:]) for name in wrapped}):
        if all(n in wrapped for n in every if n.endswith("." + short)):
            targets.append(short)
        else:
            targets.extend(sorted(n for n in wrapped if n.endswith("." + short)))
    return targets


def _modules_to_save_state(model: nn.Module, modules_to_save: list[str] | None) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of the fully trained modules (a classification head), as PEFT saves them."""
    state = {}
    for name, module in model.named_modules():
        if name and matches_any(name, modules_to_save or []):
            for pname, param in module.named_parameters():
                state[f"{name}.{pname}"] = param
    return state


def _compute_dtype_name(model: nn.Module) -> str | None:
    """The dtype the base weights were cast to before NF4 (loading.py casts, then quantizes): merge needs it to
    reproduce the quantized weights training saw."""
    return dtype_name(model.get_input_embeddings().weight.dtype)


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
    apply_lora(model, list(adapter.weights) + list(adapter.experts), r=adapter.r, alpha=adapter.alpha,
               dropout=float(adapter.config["lora_dropout"]), use_rslora=adapter.use_rslora)
    copy_weights_into(model, adapter)
    return adapter


@torch.no_grad()
def copy_weights_into(model: nn.Module, adapter: Adapter) -> None:
    """Copy the adapter's A/B into the model's LoRA layers of the same paths (linears and expert weights), and its
    fully trained tensors (modules_to_save) into the parameters of the same names. The model's LoRA layers must be
    exactly the adapter's."""
    layers = {**lora_modules(model), **expert_lora_modules(model)}
    if set(adapter.weights) | set(adapter.experts) != set(layers):
        raise ValueError(f"the adapter's LoRA modules ({len(adapter.weights) + len(adapter.experts)}) are not the "
                         f"model's ({len(layers)})")
    for name, (A, B) in [*adapter.weights.items(), *adapter.experts.items()]:
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
    _check_expert_shapes(model, adapter)
    config = adapter.config
    if not (config.get("exclude_modules") or config.get("layers_to_transform")):
        # What PEFT would wrap on this base must all have weights (PEFT itself would leave them at B = 0).
        missing = [n for n in shapes if matches_targets(n, config["target_modules"]) and n not in adapter.weights]
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


def _check_expert_shapes(model: nn.Module, adapter: Adapter) -> None:
    """Each expert weight's A (r*E, in) and B (out, r*E) fit the model's (E, out, in), and every expert weight that
    target_parameters names on this base has factors."""
    file = adapter.file(ADAPTER_WEIGHTS_FILE)
    shapes = expert_parameters(model)
    for name, (A, B) in adapter.experts.items():
        if name not in shapes:
            raise UserError(f"{file}: has LoRA weights for the expert weight {name}, which this base model does not "
                            "have: the adapter was made for a different model")
        experts, out_f, in_f = shapes[name]
        if A.shape != (adapter.r * experts, in_f) or B.shape != (out_f, adapter.r * experts):
            raise UserError(f"{file}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but this base's "
                            f"{name} has {experts} experts of (out={out_f}, in={in_f}), so r={adapter.r} needs "
                            f"({adapter.r * experts}, {in_f}) and ({out_f}, {adapter.r * experts}): the adapter was "
                            "made for a different model")
    parameters = adapter.config.get("target_parameters") or []
    missing = [n for n in shapes if matches_any(n, parameters) and n not in adapter.experts]
    if missing:
        raise UserError(f"{file}: no LoRA weights for {missing[0]} ({len(missing)} expert weight(s) in all), which "
                        f"target_parameters {parameters} names on this base: the file is incomplete or the adapter "
                        "was made for a different model")
