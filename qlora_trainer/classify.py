"""Labelling texts with a trained classifier (the inference side of tasks/classification.py): class
probabilities for texts, and the rows of a labelled file.

`qlora-trainer classify --base DIR --adapter DIR (--text ... | --file rows.jsonl)` prints each input's label and
its probability, and the accuracy when the rows carry labels (cli/classify.py).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from qlora_trainer.data import collate
from qlora_trainer.errors import UserError
from qlora_trainer.jsonl import read_objects


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 16,
            max_len: int | None = None) -> torch.Tensor:
    """Class probabilities (N, C) for texts, each fed as tokenizer(text) (defaults, nothing added)."""
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
    to_id = {name: i for i, name in enumerate(names)}
    texts, labels = [], []
    for number, row in read_objects(path, '{"text": ..., "label": ...} rows'):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path} line {number}: needs a string field 'text' (and optionally 'label')")
        texts.append(row["text"])
        labels.append(label_id(row.get("label"), to_id, f"{path} line {number}"))
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
