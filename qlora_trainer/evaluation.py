"""`eval`: how well a base (+ adapter) does on a dataset: loss and perplexity for a causal LM, loss, accuracy and
macro-F1 for a classifier.

    rows -> data.build_datasets (the format's rendering, the prompt masking, max_seq_len: what training does)
         -> every row, no split, no packing -> the adapter's task evaluates them (tasks/: Task.evaluate)

So the loss is the one training logs as eval_loss: for a causal LM the mean cross-entropy per trained token (the
response / assistant tokens and the final EOS, unless train_on_prompt), for a classifier the mean cross-entropy per
example. The task comes from the adapter (tasks.for_adapter); without an adapter the base is a causal LM.

When the adapter sits in a run folder (OUT/adapter, OUT/checkpoints/step-N), the run's config.yaml supplies the data
settings the caller leaves out (format, max_seq_len, train_on_prompt), so eval renders the rows as that run did.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from qlora_trainer import tasks
from qlora_trainer.adapter import read_adapter
from qlora_trainer.base_model import BaseModel, resolve_base
from qlora_trainer.config import ConfigError, DataConfig, load_config
from qlora_trainer.data import FILE_BUILDERS, build_datasets, load_tokenizer, pad_token_id
from qlora_trainer.errors import ArgumentError
from qlora_trainer.names import CAUSAL_LM, CLASSIFICATION, DATA_FORMATS, IGNORE_INDEX
from qlora_trainer.paths import run_config_file

# DataConfig key -> the argument of data_config that sets it
_ARGUMENTS = {"data.path": "data_path", "data.format": "data_format", "data.max_seq_len": "max_seq_len"}


def data_config(data_path: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                data_format: str | None = None, max_seq_len: int | None = None,
                train_on_prompt: bool | None = None) -> DataConfig:
    """The DataConfig that evaluates every row of `data_path`.

    What is not given comes from the adapter's run config.yaml (run_config_file) when there is one, else:
    data_format classification for a classifier adapter (a causal LM's rows need data_format), max_seq_len 2048,
    train_on_prompt false."""
    path = str(data_path)
    if os.path.splitext(path)[1].lower() in FILE_BUILDERS and not os.path.exists(path):
        raise ArgumentError("data_path", f"{{arg}} {path}: no such file")
    task = tasks.for_adapter(read_adapter(adapter)) if adapter is not None else tasks.get(CAUSAL_LM)
    run_file = run_config_file(adapter) if adapter is not None else None
    settings: dict = {"path": path, "eval_fraction": 0.0, "eval_path": None, "packing": False}
    if run_file is not None:
        run = load_config(str(run_file)).data
        settings.update(format=run.format, max_seq_len=run.max_seq_len, train_on_prompt=run.train_on_prompt)
    elif task.name == CLASSIFICATION:
        settings["format"] = CLASSIFICATION
    given = {"format": data_format, "max_seq_len": max_seq_len, "train_on_prompt": train_on_prompt}
    settings.update({key: value for key, value in given.items() if value is not None})
    if "format" not in settings:
        formats = ", ".join(f for f in DATA_FORMATS if f != CLASSIFICATION)
        why = "no run config.yaml beside the adapter says it" if adapter is not None else "give it for the base"
        raise ArgumentError("data_format", f"{{arg}} is needed: how the rows of {path} are written ({formats}); {why}")
    wanted = CLASSIFICATION if task.name == CLASSIFICATION else f"one of {', '.join(DATA_FORMATS[:-1])}"
    if (settings["format"] == CLASSIFICATION) != (task.name == CLASSIFICATION):
        what = "a classification adapter" if task.name == CLASSIFICATION else \
            "a causal LM" + ("" if adapter is None else " adapter") + " (a classifier needs its adapter)"
        raise ArgumentError("data_format", f"{{arg}} {settings['format']}: the model is {what}, so the rows must "
                                           f"be {wanted}")
    try:
        return DataConfig(**settings)
    except ConfigError as err:
        message = err.message.replace("{", "{{").replace("}", "}}")
        raise ArgumentError(_ARGUMENTS.get(err.key, err.key), message.replace(err.key, "{arg}")) from None


def evaluate_dataset(base: str | os.PathLike | BaseModel, adapter: str | os.PathLike | None, data_cfg: DataConfig, *,
                     batch_size: int = 16, compute_dtype: str | None = None, device: str | None = None,
                     loss_chunk_size: int = 1024) -> dict:
    """The metrics of base (+ adapter) on every row of data_cfg.path, rendered and masked by data_cfg as training
    does (build_datasets; eval_fraction, eval_path and packing are ignored: all rows, in file order, unpacked).

    Causal LM: {task, examples, dropped, truncated, tokens, loss (mean per trained token), perplexity (exp(loss))}.
    Classifier: {task, examples, dropped, truncated, loss (mean per example), accuracy, correct, macro_f1}."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError("batch_size", f"{{arg}} must be a positive integer, got {batch_size!r}")
    data_cfg = dataclasses.replace(data_cfg, eval_fraction=0.0, eval_path=None, packing=False)
    base = resolve_base(base)
    adapter_obj = read_adapter(adapter) if adapter is not None else None
    task = tasks.for_adapter(adapter_obj) if adapter_obj is not None else tasks.get(CAUSAL_LM)
    if (data_cfg.format == CLASSIFICATION) != (task.name == CLASSIFICATION):
        raise ArgumentError("data_format", f"{{arg}} {data_cfg.format} does not fit a {task.name} model")
    tokenizer = load_tokenizer(_tokenizer_folder(base, adapter))
    examples, _, stats = build_datasets(data_cfg, tokenizer)  # eval_fraction 0: every row is in the first list

    if adapter is None:
        from qlora_trainer.loading import load_quantized

        model = load_quantized(base, compute_dtype=compute_dtype, device=device, progress=False).eval()
    else:
        model, _ = task.load_with_adapter(base, adapter, compute_dtype=compute_dtype, device=device)
    if task.name == CLASSIFICATION:
        examples = _with_adapter_label_ids(examples, stats.label_names, model, data_cfg.path)
        pad = model.config.pad_token_id  # the pooling finds the last token that is not this one
        pad = pad if pad is not None else pad_token_id(tokenizer)
    else:
        pad = pad_token_id(tokenizer)  # masked out by the attention mask and the labels: its value never matters
    metrics = task.evaluate(task.loss_module(model, loss_chunk_size), examples, batch_size, pad,
                            next(model.parameters()).device)
    result = {"task": task.name, "examples": len(examples), "dropped": stats.dropped, "truncated": stats.truncated,
              "loss": metrics["eval_loss"]}
    if task.name == CLASSIFICATION:
        result.update(accuracy=metrics["eval_accuracy"], correct=round(metrics["eval_accuracy"] * len(examples)),
                      macro_f1=metrics["eval_f1"])
    else:
        result["tokens"] = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples)
        result["perplexity"] = math.exp(result["loss"]) if result["loss"] < 700 else math.inf
    return result


def _tokenizer_folder(base: BaseModel, adapter: str | os.PathLike | None) -> str | os.PathLike | BaseModel:
    """A tokenizer saved with the adapter (a chat template added in training) wins over the base's, as in generate."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return Path(adapter)
    return base


def _with_adapter_label_ids(examples: list[dict], data_labels: list[str], model, where: str) -> list[dict]:
    """build_datasets numbers the file's own label names in sorted order; the classifier has its own ids. Map each
    example's label through its name (or, for rows with integer ids, keep the id), as `classify --file` does."""
    from qlora_trainer.classify import label_id
    from qlora_trainer.tasks.classification import label_names_of

    to_id = {name: i for i, name in enumerate(label_names_of(model))}
    integer_ids = data_labels == [str(i) for i in range(len(data_labels))]  # rows gave ids, or names "0", "1", ...
    ids = [label_id(name if name in to_id or not integer_ids else k, to_id, where)
           for k, name in enumerate(data_labels)]
    return [{**e, "labels": ids[e["labels"]]} for e in examples]
