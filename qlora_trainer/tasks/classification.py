"""The sequence-classification task: transformers' AutoModelForSequenceClassification for the architecture (its own
head, its own pooling on the last non-padding token), the head trained in full (fp32) beside LoRA.

    input   tokenizer(text) with the tokenizer's defaults, nothing added: what a server feeding plain tokenizer
            output to the model sends, so it gets what was trained
    loss    cross-entropy over the labels, summed (training divides by the examples of the step)
    eval    loss, accuracy and macro-F1
    adapter PEFT's SEQ_CLS layout: task_type SEQ_CLS, the head under modules_to_save (its weights at
            base_model.model.score.weight); the label names and the pad id in qlora_trainer.json
    merge   config.json gets the architecture's SequenceClassification class, id2label/label2id and the pad id
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from qlora_trainer.adapter import Adapter, load_adapter_into, read_adapter
from qlora_trainer.base_model import resolve_base
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.names import ADAPTER_CONFIG_FILE, CLASSIFICATION, PEFT_TASK_TYPES
from qlora_trainer.tasks.base import VERIFY_TEXTS, Task, batches, evaluating

# What PEFT's PeftModelForSequenceClassification adds to modules_to_save by itself (peft 0.21).
PEFT_HEAD_NAMES = ["classifier", "score"]


class Classification(Task):
    name = CLASSIFICATION
    peft_task_type = PEFT_TASK_TYPES[CLASSIFICATION]

    # ------------------------------------------------------------------ training
    def head_labels(self, num_labels: int | None, stats) -> list[str]:
        """The data's labels (names sorted, or ids), padded to model.num_labels when that is larger."""
        names = list(stats.label_names)
        return names + [f"LABEL_{i}" for i in range(len(names), num_labels or 0)]

    def model_kwargs(self, *, labels: list[str] | None = None, adapter: Adapter | None = None) -> dict:
        num_labels = len(labels) if labels is not None else num_labels_of_adapter(adapter)
        return {"task": self.name, "num_labels": num_labels}

    def prepare_model(self, model: nn.Module, labels: list[str] | None, pad_token_id: int | None) -> list[nn.Parameter]:
        return prepare_head(model, labels, pad_token_id)

    def loss_module(self, model: nn.Module, loss_chunk_size: int) -> nn.Module:
        return ClassifierLoss(model)

    def eval_sums(self, loss_model: nn.Module, examples, batch_size: int, pad_id: int, device) -> list[float]:
        """[summed loss, examples, correct, then per class: true positives, false positives, false negatives]."""
        model = loss_model.model
        classes = model.config.num_labels
        total, counts = 0.0, torch.zeros(3, classes, dtype=torch.float64)
        with evaluating(loss_model):
            for batch in batches(examples, batch_size, pad_id, device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits.float()  # (B, C)
                total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                counts += class_counts(logits.argmax(-1).cpu(), batch["labels"].cpu(), classes)
        correct = float(counts[0].sum())
        return [total, float(len(examples)), correct, *counts.flatten().tolist()]

    def eval_metrics(self, sums: list[float]) -> dict:
        """{eval_loss (per example), eval_accuracy, eval_f1 (macro)}."""
        total, examples, correct = sums[:3]
        if not examples:
            return {}
        tp, fp, fn = torch.tensor(sums[3:], dtype=torch.float64).view(3, -1)
        return {"eval_loss": round(total / examples, 6), "eval_accuracy": round(correct / examples, 6),
                "eval_f1": round(f1_from_counts(tp, fp, fn), 6)}

    def progress_fields(self, metrics: dict) -> dict:
        if "eval_accuracy" not in metrics:
            return {}
        return {"acc": f"{metrics['eval_accuracy']:.3f}", "f1": f"{metrics['eval_f1']:.3f}"}

    def summary(self, metrics: dict) -> str:
        if "eval_accuracy" not in metrics:
            return ""
        return f", eval accuracy {100 * metrics['eval_accuracy']:.1f}%, macro-F1 {metrics['eval_f1']:.3f}"

    # ------------------------------------------------------------------ adapters and merge
    def adapter_settings(self, model: nn.Module) -> dict:
        """SEQ_CLS, the head in modules_to_save, the labels and the pad id the pooling uses."""
        return {"task_type": self.peft_task_type,
                "modules_to_save": sorted(set(PEFT_HEAD_NAMES) | set(head_modules(model))),
                "classifier": {"id2label": label_names_of(model), "pad_token_id": model.config.pad_token_id}}

    def load_with_adapter(self, base, adapter_dir: str | os.PathLike, *, compute_dtype=None, device=None,
                          progress: bool = False) -> tuple[nn.Module, Adapter]:
        """The base as an NF4 classifier with the adapter's LoRA and head (fp32); label names in model.config."""
        adapter = read_adapter(adapter_dir)
        if adapter.task != CLASSIFICATION:
            raise UserError(f"{adapter.file(ADAPTER_CONFIG_FILE)}: task_type is {adapter.config.get('task_type')!r}, "
                            f"not {self.peft_task_type}: this is not a classification adapter (use `qlora-trainer "
                            "generate` for a causal LM)")
        base = resolve_base(base)
        names = adapter_label_names(adapter, base.config)
        model = load_quantized(base, compute_dtype=compute_dtype, device=device, progress=progress,
                               **self.model_kwargs(labels=names))
        prepare_head(model, names, (adapter.classifier or {}).get("pad_token_id"))
        adapter = load_adapter_into(model, adapter_dir)
        model.requires_grad_(False)
        return model.eval(), adapter

    def merged_config(self, raw: dict, adapter: Adapter) -> dict:
        """The architecture's SequenceClassification class, the labels and the pad id the pooling needs (the
        base's config is a causal LM's)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        names = adapter_label_names(adapter)
        raw = dict(raw)
        architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(raw.get("model_type"))
        if architecture:
            raw["architectures"] = [architecture]
        raw["id2label"] = {str(i): name for i, name in enumerate(names)}
        raw["label2id"] = {name: i for i, name in enumerate(names)}
        pad = (adapter.classifier or {}).get("pad_token_id")
        if pad is None:
            pad = raw.get("pad_token_id")
        if pad is None and isinstance(raw.get("eos_token_id"), int):
            pad = raw["eos_token_id"]  # what loading.build_empty_model uses when the config has none
        raw["pad_token_id"] = pad
        raw.pop("num_labels", None)  # transformers derives it from id2label
        return raw

    @torch.no_grad()
    def verify_merged(self, base, adapter_dir: str | os.PathLike, merged: str | os.PathLike, *,
                      texts: list[str] | None = None, device=None) -> dict:
        """Class logits of quantized base + adapter vs the merged folder, one text at a time ("positions" counts
        texts)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        texts = texts or VERIFY_TEXTS
        model, _ = self.load_with_adapter(base, adapter_dir, compute_dtype="fp32", device=device)
        dev = next(model.parameters()).device
        ref = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).to(dev).eval()
        tokenizer = AutoTokenizer.from_pretrained(merged)
        ours, theirs = predict_logits(model, tokenizer, texts), predict_logits(ref, tokenizer, texts)
        diff = (ours - theirs).abs()
        return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
                "positions": len(texts)}


# ------------------------------------------------------------------------------------------ the head

def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier's own modules: every top-level child but the base model (`score` for LLaMA and GPT-2)."""
    prefix = getattr(model, "base_model_prefix", "model")
    return {name: module for name, module in model.named_children() if name != prefix}


def _cast_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype),) + tuple(args[1:])


_FP32_HEADS: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # heads that already cast their input up


def prepare_head(model: nn.Module, label_names: list[str] | None = None,
                 pad_token_id: int | None = None) -> list[nn.Parameter]:
    """Make the head fp32 and trainable (its input, in the compute dtype, is cast up), record the labels and the
    pad id the pooling uses in model.config. Returns the head's parameters, in a fixed order."""
    params = []
    for module in head_modules(model).values():
        module.float()
        if module not in _FP32_HEADS:
            module.register_forward_pre_hook(_cast_input_to_weight)
            _FP32_HEADS.add(module)
        for param in module.parameters():
            param.requires_grad_(True)
            params.append(param)
    config = model.config
    if label_names is not None:
        if len(label_names) != config.num_labels:
            raise ValueError(f"{len(label_names)} label names for a head of {config.num_labels} labels")
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id  # the id collate pads with: the pooling skips exactly these
    return params


# ------------------------------------------------------------------------------------------ labels

def label_names_of(model: nn.Module) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(model.config.num_labels)]


def num_labels_of_adapter(adapter: Adapter) -> int:
    """Rows of the head's weight in a SEQ_CLS adapter (ours or PEFT's)."""
    heads = [t for name, t in adapter.extra.items() if name.endswith(".weight") and t.dim() == 2]
    if not heads:
        raise UserError(f"{adapter.path}: this SEQ_CLS adapter has no head weights (modules_to_save): "
                        "it cannot classify; save it with the head (PEFT does this for task_type SEQ_CLS)")
    return int(heads[0].shape[0])


def adapter_label_names(adapter: Adapter, base_config=None) -> list[str]:
    """Label names saved with the adapter; for PEFT's adapters the base config's id2label when it fits, else
    LABEL_0, LABEL_1, ... (transformers' default names)."""
    n = num_labels_of_adapter(adapter)
    saved = (adapter.classifier or {}).get("id2label")
    if isinstance(saved, list) and len(saved) == n:
        return [str(x) for x in saved]
    id2label = getattr(base_config, "id2label", None) or {}
    if len(id2label) == n and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        return [str(id2label[i]) for i in range(n)]
    return [f"LABEL_{i}" for i in range(n)]


# ------------------------------------------------------------------------------------------ loss and metrics

class ClassifierLoss(nn.Module):
    """Wraps a transformers sequence classifier: forward(batch) -> (summed cross-entropy, examples)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, C)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()


def class_counts(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(3, C) float64: true positives, false positives and false negatives of each class."""
    classes = torch.arange(num_labels).unsqueeze(1)  # (C, 1)
    predicted, actual = preds.unsqueeze(0) == classes, labels.unsqueeze(0) == classes  # (C, N)
    return torch.stack([(predicted & actual).sum(1), (predicted & ~actual).sum(1),
                        (~predicted & actual).sum(1)]).double()


def f1_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> float:
    """Mean over the classes present in labels or predictions of 2TP / (2TP + FP + FN) (sklearn's macro F1)."""
    present = (tp + fp + fn) > 0
    if not present.any():
        return 0.0
    return float((2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])).mean())


def predict_logits(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Class logits (N, C) of each text fed alone as tokenizer(text)."""
    dev = next(model.parameters()).device
    return torch.cat([model(input_ids=torch.tensor([tokenizer(t)["input_ids"]], device=dev)).logits.float().cpu()
                      for t in texts])  # (N, C)
