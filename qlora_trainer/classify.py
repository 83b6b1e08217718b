"""Classification on the NF4 + LoRA path: transformers' AutoModelForSequenceClassification for the architecture
(its own head, its own pooling on the last non-padding token), the head trained in full (fp32) beside LoRA.

    input   tokenizer(text) with the tokenizer's defaults, nothing added: what a server feeding plain tokenizer
            output to the model sends, so it gets what was trained
    loss    cross-entropy over the labels, summed (train.py divides by the examples of the step)
    eval    loss, accuracy and macro-F1
    adapter PEFT's SEQ_CLS layout: task_type SEQ_CLS, the head under modules_to_save (its weights at
            base_model.model.score.weight); the label names and the pad id in qlora_trainer.json

`qlora-trainer classify --base DIR --adapter DIR (--text ... | --file rows.jsonl)` prints each input's label and
its probability, and the accuracy when the rows carry labels.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qlora_trainer.errors import UserError

TASK_TYPE = "SEQ_CLS"
# What PEFT's PeftModelForSequenceClassification adds to modules_to_save by itself (peft 0.21).
PEFT_HEAD_NAMES = ["classifier", "score"]


# ------------------------------------------------------------------------------------------ the head

def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier's own modules: every top-level child but the base model (`score` for LLaMA and GPT-2)."""
    prefix = getattr(model, "base_model_prefix", "model")
    return {name: module for name, module in model.named_children() if name != prefix}


def _cast_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype),) + tuple(args[1:])


def prepare_head(model: nn.Module, label_names: list[str] | None = None,
                 pad_token_id: int | None = None) -> list[nn.Parameter]:
    """Make the head fp32 and trainable (its input, in the compute dtype, is cast up), record the labels and the
    pad id the pooling uses in model.config. Returns the head's parameters, in a fixed order."""
    params = []
    for module in head_modules(model).values():
        module.float()
        if not getattr(module, "_qlora_fp32_hook", False):
            module.register_forward_pre_hook(_cast_input_to_weight)
            module._qlora_fp32_hook = True
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


def label_names_for(num_labels: int | None, stats) -> list[str]:
    """The head's labels: the data's (names sorted, or ids), padded to model.num_labels when that is larger."""
    names = list(stats.label_names)
    return names + [f"LABEL_{i}" for i in range(len(names), num_labels or 0)]


def bar_fields(metrics: dict) -> dict:
    """Progress-bar fields of the last eval of a classifier: acc, f1 ({} for a causal LM)."""
    if "eval_accuracy" not in metrics:
        return {}
    return {"acc": f"{metrics['eval_accuracy']:.3f}", "f1": f"{metrics['eval_f1']:.3f}"}


def summary_fields(metrics: dict) -> str:
    if "eval_accuracy" not in metrics:
        return ""
    return f", eval accuracy {100 * metrics['eval_accuracy']:.1f}%, macro-F1 {metrics['eval_f1']:.3f}"


def label_names_of(model: nn.Module) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(model.config.num_labels)]


def adapter_settings(model: nn.Module) -> dict:
    """The write_adapter_files settings of a classifier: SEQ_CLS, the head in modules_to_save, labels and pad."""
    return dict(task_type=TASK_TYPE,
                extra_config={"modules_to_save": sorted(set(PEFT_HEAD_NAMES) | set(head_modules(model)))},
                classifier={"id2label": label_names_of(model), "pad_token_id": model.config.pad_token_id})


def num_labels_of_adapter(adapter) -> int:
    """Rows of the head's weight in a SEQ_CLS adapter (ours or PEFT's)."""
    heads = [t for name, t in adapter.extra.items() if name.endswith(".weight") and t.dim() == 2]
    if not heads:
        raise UserError(f"{adapter.path}: this SEQ_CLS adapter has no head weights (modules_to_save): "
                        "it cannot classify; save it with the head (PEFT does this for task_type SEQ_CLS)")
    return int(heads[0].shape[0])


def adapter_label_names(adapter, base_config=None) -> list[str]:
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


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Mean over the classes present in labels or predictions of 2TP / (2TP + FP + FN) (sklearn's macro F1)."""
    scores = []
    for c in range(num_labels):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def evaluate_classifier(loss_model: ClassifierLoss, examples: list[dict], batch_size: int, pad_id: int,
                        device) -> dict:
    """{eval_loss, eval_accuracy, eval_f1} over `examples` ({} when there are none)."""
    from qlora_trainer.data import collate

    if not examples:
        return {}
    was_training = loss_model.training
    loss_model.eval()
    total, preds, labels = 0.0, [], []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        logits = loss_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).logits.float()  # (B, C)
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    loss_model.train(was_training)
    preds, labels = torch.cat(preds), torch.cat(labels)
    num_labels = loss_model.model.config.num_labels
    return {"eval_loss": round(total / len(examples), 6),
            "eval_accuracy": round(float((preds == labels).float().mean()), 6),
            "eval_f1": round(macro_f1(preds, labels, num_labels), 6)}


# ------------------------------------------------------------------------------------------ inference

def load_classifier(base: str | os.PathLike, adapter_dir: str | os.PathLike, *, compute_dtype=None, device=None,
                    progress: bool = False):
    """(model, adapter, label names): the base as an NF4 classifier with the adapter's LoRA and head (fp32)."""
    from qlora_trainer.adapter import load_adapter_into, read_adapter
    from qlora_trainer.loading import load_quantized, read_config, resolve_model_dir

    adapter = read_adapter(adapter_dir)
    task = adapter.config.get("task_type")
    if task != TASK_TYPE:
        raise UserError(f"{Path(adapter_dir) / 'adapter_config.json'}: task_type is {task!r}, not {TASK_TYPE}: "
                        "this is not a classification adapter (use `qlora-trainer generate` for a causal LM)")
    names = adapter_label_names(adapter, read_config(resolve_model_dir(base)))
    model = load_quantized(base, compute_dtype=compute_dtype, device=device, task="classification",
                           num_labels=len(names), progress=progress)
    prepare_head(model, names, (adapter.classifier or {}).get("pad_token_id"))
    load_adapter_into(model, adapter_dir)
    model.requires_grad_(False)
    return model.eval(), adapter, names


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 16,
            max_len: int | None = None) -> torch.Tensor:
    """Class probabilities (N, C) for texts, each fed as tokenizer(text) (defaults, nothing added)."""
    from qlora_trainer.data import collate

    pad = model.config.pad_token_id
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        examples = []
        for text in texts[start:start + batch_size]:
            ids = tokenizer(text)["input_ids"][:max_len]
            if not ids:
                raise UserError(f"the text {text!r} is empty after tokenization: nothing to classify")
            examples.append({"input_ids": ids, "labels": 0})
        batch = collate(examples, pad if pad is not None else 0)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits.float()  # (B, C)
        out.append(torch.softmax(logits, -1).cpu())
    return torch.cat(out)


def read_rows(path: str | os.PathLike, names: list[str]) -> tuple[list[str], list[int | None]]:
    """Texts and label ids (None where a row has no label) of a jsonl file of {"text", "label"?} rows. A label is
    a name the adapter knows or an id below num_labels; anything else is a UserError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file: --file takes a .jsonl file of {{\"text\": ..., \"label\": ...}} rows")
    to_id = {name: i for i, name in enumerate(names)}
    texts, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number}: invalid JSON ({err.msg}): each line must be one JSON object") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path} line {number}: needs a string field 'text' (and optionally 'label')")
        texts.append(row["text"])
        labels.append(label_id(row.get("label"), to_id, f"{path} line {number}"))
    if not texts:
        raise UserError(f"{path}: has no rows")
    return texts, labels


def label_id(label, to_id: dict[str, int], where: str) -> int | None:
    """A row's label as an id: a known name, or an int id below the number of labels."""
    if label is None:
        return None
    if isinstance(label, str):
        if label not in to_id:
            raise UserError(f"{where}: unknown label {label!r}: this classifier's labels are {', '.join(to_id)}")
        return to_id[label]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise UserError(f"{where}: label {label!r} must be a label name or an id 0..{len(to_id) - 1}")
    if label >= len(to_id):
        raise UserError(f"{where}: label id {label} is out of range: this classifier has {len(to_id)} labels "
                        f"(ids 0..{len(to_id) - 1}: {', '.join(to_id)})")
    return label


def run_classify_command(args: argparse.Namespace) -> int:
    """`qlora-trainer classify` (flags in cli.py)."""
    from transformers import AutoTokenizer

    from qlora_trainer.loading import resolve_model_dir

    if (args.text is None) == (args.file is None):
        raise UserError("classify: pass exactly one of --text \"...\" or --file rows.jsonl")
    model_dir = resolve_model_dir(args.base)
    model, _, names = load_classifier(model_dir, args.adapter, compute_dtype=args.dtype, device=args.device)
    if args.file is not None:
        texts, gold = read_rows(args.file, names)
    else:
        texts, gold = list(args.text), [None] * len(args.text)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    probs = predict(model, tokenizer, texts, batch_size=args.batch_size)
    hits = 0
    for text, p, g in zip(texts, probs, gold):
        k = int(p.argmax())
        mark = "" if g is None else ("  ok" if k == g else f"  WRONG (label {names[g]})")
        hits += g is not None and k == g
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"{names[k]}\t{float(p[k]):.4f}\t{shown}{mark}")
    labelled = sum(g is not None for g in gold)
    if labelled:
        print(f"accuracy: {hits}/{labelled} = {100 * hits / labelled:.1f}%")
    return 0


# ------------------------------------------------------------------------------------------ merge

def merged_config(raw: dict, adapter) -> dict:
    """config.json of a merged classifier: the architecture's SequenceClassification class, the labels and the
    pad id the pooling needs (the base's config is a causal LM's)."""
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
def verify_merged_classifier(base, adapter_dir, merged, *, texts: list[str], device=None) -> dict:
    """merge --verify for a classifier: class logits of quantized base + adapter vs the merged folder (plain
    transformers, fp32), one text at a time. "positions" counts texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, _, _ = load_classifier(base, adapter_dir, compute_dtype="fp32", device=device)
    dev = next(model.parameters()).device
    ref = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ours, theirs = predict_logits(model, tokenizer, texts), predict_logits(ref, tokenizer, texts)
    diff = (ours - theirs).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()), "positions": len(texts)}


def predict_logits(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(input_ids=torch.tensor([tokenizer(t)["input_ids"]], device=dev)).logits.float().cpu()
                      for t in texts])  # (N, C)


def write_merged_config(config_file: Path, adapter) -> None:
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps(merged_config(raw, adapter), indent=2) + "\n", encoding="utf-8")
