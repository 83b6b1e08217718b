"""`eval`: the loss of a causal LM against plain transformers (+ PEFT) on the same tokenized examples, perplexity =
exp(loss), a classifier's accuracy and macro-F1 against what `classify --file` prints for the same rows, the run's
own eval_loss reproduced from its config.yaml, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoTokenizer

from qlora_trainer import tasks
from qlora_trainer.adapter import save_adapter
from qlora_trainer.cli import main
from qlora_trainer.config import DataConfig, build_config
from qlora_trainer.data import build_datasets
from qlora_trainer.evaluation import data_config, evaluate_dataset
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora
from qlora_trainer.names import IGNORE_INDEX
from qlora_trainer.tasks.classification import prepare_head
from tests.helpers import ASSET, DEMO, REPO, transformers_nf4, write_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["negative", "neutral", "positive"]
CPU = ["--dtype", "fp32", "--device", "cpu"]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def chat_rows(folder) -> Path:
    rows = [json.loads(line) for line in (DEMO / "eval.jsonl").read_text().splitlines()[:12]]
    return _write_rows(folder / "chat.jsonl", rows)


@pytest.fixture(scope="module")
def lm_adapter(folder) -> Path:
    return write_peft_adapter(ASSET, folder / "lm-adapter", seed=3, b_std=0.05)


@pytest.fixture(scope="module")
def classifier(folder) -> Path:
    """A SEQ_CLS adapter of ours with random LoRA B and a random head (labels negative, neutral, positive) that sees
    only how a text's pooled state differs from the mean over the sentiment texts, so its labels vary by text."""
    model = load_quantized(ASSET, compute_dtype="fp32", device="cpu", task="classification", num_labels=3,
                           progress=False)
    apply_lora(model, r=4, alpha=8)
    prepare_head(model, NAMES)
    gen = torch.Generator().manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(ASSET)
    texts = [json.loads(line)["text"] for line in (REPO / "data/sentiment/eval.jsonl").read_text().splitlines()[:45]]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        pooled = torch.stack([model.model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).last_hidden_state[0, -1]
                              for t in texts])  # (N, hidden): what the head sees, the last token of each text
        mean = pooled.mean(0)
        head = torch.randn(model.score.weight.shape, generator=gen)  # (3, hidden)
        model.score.weight.copy_(head - (head @ mean)[:, None] * mean / mean.dot(mean))  # head @ mean = 0
    return save_adapter(model, folder / "cls-adapter", base_model_name_or_path=str(ASSET),
                        **tasks.get("classification").adapter_settings(model))


def _reference_loss(model, examples: list[dict]) -> tuple[float, int]:
    """Mean next-token cross-entropy over the labelled tokens, one example at a time (no padding), from the logits of
    a plain transformers model: position t-1 predicts labels[t]."""
    total, count = 0.0, 0
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()  # (T, V)
        total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count, count


def _printed_loss(out: str) -> tuple[float, float]:
    match = re.search(r"loss (\S+) per scored token, perplexity (\S+)", out)
    assert match, out
    return float(match[1]), float(match[2])


@pytest.mark.parametrize("with_adapter", [True, False], ids=["adapter", "base"])
def test_causal_lm_loss_equals_transformers_on_the_same_tokenized_examples(with_adapter, lm_adapter, chat_rows,
                                                                           capsys):
    adapter = lm_adapter if with_adapter else None
    data_cfg = DataConfig(path=str(chat_rows), format="chat", max_seq_len=24, eval_fraction=0.0)
    examples, _, stats = build_datasets(data_cfg, AutoTokenizer.from_pretrained(ASSET))
    assert len(examples) == 12 and stats.truncated > 0  # some rows are cut at 24 tokens, as training cuts them
    reference = transformers_nf4(ASSET)
    if with_adapter:
        reference = PeftModel.from_pretrained(reference, adapter).eval()
    expected, tokens = _reference_loss(reference, examples)

    result = evaluate_dataset(ASSET, adapter, data_cfg, batch_size=5, compute_dtype="fp32", device="cpu")
    assert (result["task"], result["examples"], result["tokens"], result["truncated"]) == \
        ("causal_lm", 12, tokens, stats.truncated)
    assert result["loss"] == pytest.approx(expected, rel=1e-5, abs=2e-6)
    assert result["perplexity"] == math.exp(result["loss"])

    argv = ["eval", "--base", str(ASSET), "--data", str(chat_rows), "--format", "chat", "--max-seq-len", "24", *CPU]
    assert main(argv + (["--adapter", str(adapter)] if adapter else [])) == 0
    out = capsys.readouterr().out
    loss, perplexity = _printed_loss(out)
    assert loss == pytest.approx(expected, abs=6e-5) and perplexity == pytest.approx(math.exp(loss), rel=1e-3)
    assert f"12 rows, {tokens} scored tokens" in out
    if with_adapter:  # the adapter is applied: its loss is not the base's
        base, _ = _reference_loss(transformers_nf4(ASSET), examples)
        assert abs(base - expected) > 1e-2


def test_only_the_trained_tokens_are_scored(chat_rows):
    """--train-on-prompt scores the prompt too: more tokens, another loss (so the default masks, as training does)."""
    masked = evaluate_dataset(ASSET, None, data_config(chat_rows, data_format="chat", max_seq_len=48),
                              device="cpu", compute_dtype="fp32")
    everything = evaluate_dataset(ASSET, None, data_config(chat_rows, data_format="chat", max_seq_len=48,
                                                           train_on_prompt=True), device="cpu", compute_dtype="fp32")
    assert everything["tokens"] > 2 * masked["tokens"] and everything["loss"] != masked["loss"]


def _classify_output(capsys, adapter: Path, rows: Path) -> tuple[list[str], str]:
    assert main(["classify", "--base", str(ASSET), "--adapter", str(adapter), "--file", str(rows), *CPU]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.split("\t")[0] for line in lines[:-1]], lines[-1]


def _macro_f1(predicted: list[str], gold: list[str]) -> float:
    scores = []
    for c in sorted(set(predicted) | set(gold)):
        tp = sum(p == g == c for p, g in zip(predicted, gold))
        fp = sum(p == c != g for p, g in zip(predicted, gold))
        fn = sum(g == c != p for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("rows_kind", ["all labels", "no negative rows", "integer ids"])
def test_classifier_accuracy_equals_what_classify_reports(rows_kind, classifier, folder, capsys):
    """The same rows through `classify --file` and `eval`: the same accuracy line, and the macro-F1 of classify's
    printed labels. A file without one of the labels numbers its own labels differently: eval goes by the names."""
    rows = [json.loads(line) for line in (REPO / "data/sentiment/eval.jsonl").read_text().splitlines()[:45]]
    if rows_kind == "no negative rows":
        rows = [r for r in rows if r["label"] != "negative"]
    elif rows_kind == "integer ids":
        rows = [{"text": r["text"], "label": NAMES.index(r["label"])} for r in rows]
    path = _write_rows(folder / f"{rows_kind.replace(' ', '-')}.jsonl", rows)
    predicted, accuracy_line = _classify_output(capsys, classifier, path)
    gold = [NAMES[r["label"]] if isinstance(r["label"], int) else r["label"] for r in rows]
    assert len(set(predicted)) > 1 and accuracy_line.startswith("accuracy: ")  # not one label for every row

    assert main(["eval", "--base", str(ASSET), "--adapter", str(classifier), "--data", str(path), *CPU]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == accuracy_line
    f1 = float(re.search(r"macro-F1 (\S+)", out[-2])[1])
    assert f1 == pytest.approx(_macro_f1(predicted, gold), abs=5e-4)
    assert out[0].startswith(f"eval: {path} (format classification, max_seq_len 2048): {len(rows)} rows")


def test_eval_of_a_run_adapter_reproduces_the_runs_eval_loss(tmp_path, capsys):
    """A run's adapter and its eval file, nothing else: the format, max_seq_len and masking come from the run's
    config.yaml, and the loss is the eval_loss the run logged."""
    from qlora_trainer.train import train

    lines = (DEMO / "train.jsonl").read_text().splitlines()
    _write_rows(tmp_path / "train.jsonl", [json.loads(line) for line in lines[:32]])
    _write_rows(tmp_path / "eval.jsonl", [json.loads(line) for line in lines[32:42]])
    cfg = build_config({"model.path": str(ASSET), "model.compute_dtype": "fp32",
                        "data.path": str(tmp_path / "train.jsonl"), "data.format": "chat",
                        "data.eval_path": str(tmp_path / "eval.jsonl"), "data.max_seq_len": 40,
                        "lora.r": 4, "lora.alpha": 8, "train.optimizer": "adamw", "train.batch_size": 4,
                        "train.grad_accum": 1, "train.lr": 1e-2, "train.warmup_steps": 0, "train.max_steps": 3,
                        "train.eval_every": 3, "train.save_every": 3, "out": str(tmp_path / "run")})
    result = train(cfg, progress=False, log=lambda *_: None)
    assert main(["eval", "--base", str(ASSET), "--adapter", str(result.adapter), "--data", str(tmp_path / "eval.jsonl"),
                 *CPU]) == 0
    out = capsys.readouterr().out
    assert f"(format chat, max_seq_len 40, from {tmp_path / 'run' / 'config.yaml'})" in out
    assert _printed_loss(out)[0] == pytest.approx(result.eval_loss, abs=6e-5)


@pytest.mark.parametrize("argv, message", [
    (["--format", "chat"], r"eval needs --data FILE"),
    (["--data", "DATA", "--format", "alpaca"], r"chat\.jsonl row 1: missing field 'instruction'"),
    (["--data", "DATA"], r"--format is needed: how the rows of .*chat\.jsonl are written"),
    (["--data", "DATA", "--format", "classification"], r"--format classification: the model is a causal LM"),
    (["--data", "DATA", "--adapter", "CLASSIFIER", "--format", "chat"], r"--format chat: the model is a classifi"),
    (["--data", "FOLDER/nope.jsonl", "--format", "text"], r"--data .*nope\.jsonl: no such file"),
    (["--data", "DATA", "--format", "chat", "--max-seq-len", "4"], r"--max-seq-len must be at least 8"),
    (["--data", "DATA", "--format", "chat", "--batch-size", "0"], r"--batch-size must be a positive integer"),
    (["--data", "FOLDER/toast.jsonl", "--adapter", "CLASSIFIER"], r"toast\.jsonl: unknown label 'toast'"),
])
def test_bad_input_is_one_line_exit_2(argv, message, chat_rows, classifier, folder, capsys):
    _write_rows(folder / "toast.jsonl", [{"text": "the cake", "label": "positive"}, {"text": "x", "label": "toast"}])
    argv = [a.replace("DATA", str(chat_rows)).replace("CLASSIFIER", str(classifier)).replace("FOLDER", str(folder))
            for a in argv]
    assert main(["eval", "--base", str(ASSET), *argv, *CPU]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
