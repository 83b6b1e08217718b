"""Classification on the NF4 + LoRA path (tiny LLaMA and tiny GPT-2): the causal checkpoint loads as an NF4
AutoModelForSequenceClassification, the SEQ_CLS adapter interoperates with PEFT both ways, merge writes a folder
transformers loads as the same classifier, labels round-trip, resume is exact, bad input is one clear line, and a
classifier learns the bundled task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import quant, tasks
from qlora_trainer import train as train_mod
from qlora_trainer.adapter import save_adapter
from qlora_trainer.cli import main
from qlora_trainer.config import build_config
from qlora_trainer.data import collate
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora
from qlora_trainer.merge import merge
from qlora_trainer.tasks.classification import label_names_of, prepare_head
from tests.helpers import ASSET, REPO, Stop, logits_of, save_then_die, transformers_nf4_classifier

NAMES = ["negative", "neutral", "positive"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base(request, gpt2) -> Path:
    return ASSET if request.param == "llama" else gpt2


def _batch(vocab: int, pad: int) -> dict:
    """Two right-padded rows of different lengths: the pooling must pick each row's last real token."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 5)]
    rows = [[t if t != pad else pad + 1 for t in r] for r in rows]
    batch = collate([{"input_ids": r, "labels": 0} for r in rows], pad)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _our_classifier(path: Path, out: Path, seed: int = 0):
    model = load_quantized(path, compute_dtype="fp32", device="cpu", task="classification", num_labels=3,
                           progress=False)
    apply_lora(model, r=4, alpha=8)
    prepare_head(model, NAMES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or name == "score.weight":
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_adapter(model, out, base_model_name_or_path=str(path), **tasks.get("classification").adapter_settings(model))
    return model.eval()


def test_eval_sums_of_two_parts_give_the_metrics_of_the_whole_set(tmp_path):
    """What processes sharing an eval set do (train's evaluate adds their eval_sums). Checked against each example's
    prediction and loss computed alone, and a macro-F1 written out class by class."""
    model = _our_classifier(ASSET, tmp_path)
    gen = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(3, 200, (int(n),), generator=gen).tolist(), "labels": i % 3}
                for i, n in enumerate(torch.randint(4, 12, (11,), generator=gen))]
    pad = model.config.pad_token_id
    assert pad is not None and all(pad not in e["input_ids"] for e in examples)
    task, loss_model = tasks.get("classification"), tasks.get("classification").loss_module(model, 1024)
    parts = [task.eval_sums(loss_model, part, 4, pad, "cpu") for part in (examples[:5], examples[5:])]
    metrics = task.eval_metrics([a + b for a, b in zip(*parts)])

    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0].float() for e in examples]
    predicted, gold = [int(x.argmax()) for x in logits], [e["labels"] for e in examples]
    loss = sum(float(torch.nn.functional.cross_entropy(x[None], torch.tensor([g]))) for x, g in zip(logits, gold))
    f1s = []
    for c in sorted(set(predicted) | set(gold)):
        tp = sum(p == g == c for p, g in zip(predicted, gold))
        wrong = sum(p == c != g for p, g in zip(predicted, gold)) + sum(g == c != p for p, g in zip(predicted, gold))
        f1s.append(2 * tp / (2 * tp + wrong))
    assert len(set(predicted)) > 1
    assert metrics["eval_accuracy"] == pytest.approx(sum(p == g for p, g in zip(predicted, gold)) / 11, abs=1e-6)
    assert metrics["eval_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(loss / 11, abs=1e-5)
    assert task.eval_metrics(task.eval_sums(loss_model, [], 4, pad, "cpu")) == {}


def test_causal_checkpoint_loads_as_an_nf4_classifier_like_transformers():
    ours = load_quantized(ASSET, compute_dtype="fp32", device="cpu", task="classification", num_labels=3,
                          progress=False)  # the checkpoint's lm_head.weight is not "unexpected"
    ref = transformers_nf4_classifier(ASSET, 3, ours.config.pad_token_id)
    ours_layers = {n: m for n, m in ours.named_modules() if quant.is_nf4_linear(m)}
    ref_layers = {n: m for n, m in ref.named_modules() if quant.is_nf4_linear(m)}
    assert set(ours_layers) == set(ref_layers) and "score" not in ours_layers
    for name, layer in ours_layers.items():
        assert torch.equal(layer.weight.data, ref_layers[name].weight.data), name
    assert ours.score.weight.shape == (3, 128) and not hasattr(ours, "lm_head")
    with torch.no_grad():
        ref.score.weight.copy_(ours.score.weight)
    batch = _batch(ours.config.vocab_size, ours.config.pad_token_id)
    assert torch.equal(logits_of(ours, batch), logits_of(ref, batch))


def test_seq_cls_adapter_loads_in_peft_and_peft_adapter_loads_in_ours(base, tmp_path):
    ours = _our_classifier(base, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved["base_model.model.score.weight"].dtype == torch.float32
    pad = ours.config.pad_token_id
    batch = _batch(ours.config.vocab_size, pad)

    theirs = PeftModel.from_pretrained(transformers_nf4_classifier(base, 3, pad), tmp_path / "ours").eval()
    torch.testing.assert_close(logits_of(theirs, batch), logits_of(ours, batch), atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(transformers_nf4_classifier(base, 3, pad),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "score" in name):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded, _ = tasks.get("classification").load_with_adapter(base, tmp_path / "peft", compute_dtype="fp32",
                                                              device="cpu")
    names = label_names_of(loaded)
    assert names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(peft_model.eval(), batch), atol=1e-5, rtol=1e-5)


def test_merged_classifier_loads_in_transformers_with_head_and_labels(base, tmp_path):
    ours = _our_classifier(base, tmp_path / "adapter")
    out = merge(base, tmp_path / "adapter", tmp_path / "merged", dtype="fp32", compute_dtype="fp32", progress=False)
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.id2label == dict(enumerate(NAMES)) and merged.config.label2id == {n: i for i, n in
                                                                                             enumerate(NAMES)}
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "score.weight" in keys and "lm_head.weight" not in keys
    batch = _batch(ours.config.vocab_size, ours.config.pad_token_id)
    torch.testing.assert_close(logits_of(merged, batch), logits_of(ours, batch), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ training

def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, out: str, **overrides):
    train_rows = [json.loads(line) for line in (REPO / "data/sentiment/train.jsonl").read_text().splitlines()[:48]]
    flat = {"model.path": str(ASSET), "model.compute_dtype": "fp32", "model.task": "classification",
            "data.path": str(_rows(tmp_path / "train.jsonl", train_rows)), "data.format": "classification",
            "data.eval_path": str(_rows(tmp_path / "eval.jsonl", train_rows[:8])), "data.max_seq_len": 32,
            "lora.r": 2, "lora.alpha": 4, "lora.dropout": 0.1, "train.optimizer": "adamw", "train.batch_size": 4,
            "train.grad_accum": 1, "train.lr": 3e-3, "train.warmup_steps": 1, "train.max_steps": 4,
            "train.save_every": 2, "train.eval_every": 2, "train.log_every": 1, "out": str(tmp_path / out)}
    flat.update(overrides)
    return build_config(flat)


@pytest.mark.slow
def test_classifier_resume_is_bitwise_identical_head_included(tmp_path, monkeypatch):
    straight = train_mod.train(_config(tmp_path, "straight"), progress=False, log=lambda *_: None)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"eval_loss", "eval_accuracy", "eval_f1"} <= set(metrics[-1])
    assert set(straight.eval_metrics) == {"eval_loss", "eval_accuracy", "eval_f1"}

    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die(real_save, at_step=2))
    with pytest.raises(Stop):
        train_mod.train(_config(tmp_path, "resumed"), progress=False, log=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    cfg = _config(tmp_path, "resumed")
    cfg.resume = True
    train_mod.train(cfg, progress=False, log=lambda *_: None)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in a and a.keys() == b.keys()
    first = load_file(ckpt.checkpoint_dir(tmp_path / "straight", 2) / "adapter_model.safetensors")
    assert not torch.equal(first["base_model.model.score.weight"], a["base_model.model.score.weight"])  # it trains
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_label_names_round_trip_and_bad_input(tmp_path, capsys):
    rows = [{"text": f"the {w} is here.", "label": lab} for w, lab in
            [("cat", "spam"), ("dog", "ham"), ("bird", "eggs"), ("cow", "spam")] * 4]
    cfg = _config(tmp_path, "run", **{"data.path": str(_rows(tmp_path / "names.jsonl", rows)),
                                      "data.eval_path": str(tmp_path / "names.jsonl"), "train.max_steps": 2})
    train_mod.train(cfg, progress=False, log=lambda *_: None)
    adapter = tmp_path / "run" / "adapter"
    ours = json.loads((adapter / "qlora_trainer.json").read_text())
    assert ours["classifier"]["id2label"] == ["eggs", "ham", "spam"]  # names map to ids in sorted order
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(ASSET), "--adapter", str(adapter), "--out", str(merged), "--dtype",
                 "fp32", "--verify", "--quiet"]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "eggs", "1": "ham", "2": "spam"} and config["label2id"]["spam"] == 2
    assert config["architectures"] == ["LlamaForSequenceClassification"]

    file = _rows(tmp_path / "rows.jsonl", [{"text": "the cat is here.", "label": "spam"},
                                           {"text": "the dog is here.", "label": 1}, {"text": "no label"}])
    capsys.readouterr()
    assert main(["classify", "--base", str(ASSET), "--adapter", str(adapter), "--file", str(file),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.split("\t")[0] in {"eggs", "ham", "spam"} for line in out[:3])
    assert out[-1].startswith("accuracy: ") and "/2 " in out[-1]
    # Each --text line: the label and probability of softmax(logits) of PEFT's model over transformers' NF4
    # classifier with this adapter, for tokenizer(text) as it is.
    texts = ["the cow", "the dog is here."]
    assert main(["classify", "--base", str(ASSET), "--adapter", str(adapter), "--text", texts[0], "--text", texts[1],
                 "--device", "cpu"]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    reference = PeftModel.from_pretrained(
        transformers_nf4_classifier(ASSET, 3, ours["classifier"]["pad_token_id"]), adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSET)
    assert len(printed) == len(texts)
    for text, (label, prob, shown) in zip(texts, printed):
        probs = torch.softmax(logits_of(reference, torch.tensor([tokenizer(text).input_ids]))[0], -1)  # (3,)
        k = int(probs.argmax())
        assert (label, shown) == (["eggs", "ham", "spam"][k], text)
        assert abs(float(prob) - float(probs[k])) <= 5e-5 + 1e-6, (prob, probs)  # printed to 4 decimals

    bad = [([{"text": "x", "label": "toast"}], "unknown label 'toast'.*eggs, ham, spam"),
           ([{"text": "x", "label": 3}], "label id 3 is out of range.*3 labels")]
    for i, (rows, message) in enumerate(bad):
        path = _rows(tmp_path / f"bad{i}.jsonl", rows)
        capsys.readouterr()
        assert main(["classify", "--base", str(ASSET), "--adapter", str(adapter), "--file", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"bad{i}.jsonl line 1" in err
        assert re.search(message, err), err
    assert main(["generate", "--base", str(ASSET), "--adapter", str(adapter), "--prompt", "hi"]) == 2
    assert "SEQ_CLS" in capsys.readouterr().err
    assert main(["inspect", str(adapter), "--base", str(ASSET), "--device", "cpu"]) == 0  # head and all
    with pytest.raises(UserError, match=r"train\.jsonl has 3 labels but model\.num_labels is 2"):
        train_mod.train(_config(tmp_path, "few", **{"model.num_labels": 2}), progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_classifier_learns_the_bundled_task_well_above_chance(tmp_path):
    eval_rows = (REPO / "data/sentiment/eval.jsonl").read_text().splitlines()[:60]
    (tmp_path / "heldout.jsonl").write_text("\n".join(eval_rows) + "\n")  # rows the training never sees
    cfg = _config(tmp_path, "learn", **{"data.path": str(REPO / "data/sentiment/train.jsonl"),
                                        "data.eval_path": str(tmp_path / "heldout.jsonl"), "train.max_steps": 40,
                                        "train.batch_size": 32, "train.eval_every": 40, "train.save_every": 40,
                                        "train.lr": 5e-3, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0})
    result = train_mod.train(cfg, progress=False, log=lambda *_: None)
    # chance is 1/3; this run reaches 0.78 on the 60 held-out rows (0.5 with the head frozen at its init)
    assert result.eval_metrics["eval_accuracy"] >= 0.65, result.eval_metrics
