"""Nothing lost, nothing run (issue 6): bad input through the CLI, corruption, a full disk, one run per folder,
no code in what we load, training health. Each test names the promise of RELIABILITY.md it proves.

The kill/resume test is in tests/test_kill_resume.py; scripts/fault_injection.py runs many more rounds."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
import yaml

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import atomic, cli, lock, shards
from qlora_trainer import train as train_mod
from qlora_trainer.adapter import read_adapter, save_adapter
from qlora_trainer.config import load_config
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora, lora_modules
from qlora_trainer.loss import CausalLMLoss
from tests.helpers import ASSET, DEMO, REPO, write_tiny_llama



# ------------------------------------------------------------------------------------------ shared material

@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Small data files, an adapter for the shipped tiny model, and one for another base."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "train.jsonl").write_text("\n".join((DEMO / "train.jsonl").read_text().splitlines()[:32]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((DEMO / "eval.jsonl").read_text().splitlines()[:4]) + "\n")
    paths = {"root": root, "train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    for name, base in (("adapter", ASSET), ("other_adapter", write_tiny_llama(root / "other-base", shard_size=None))):
        model = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
        torch.manual_seed(0)
        apply_lora(model, "all-linear", r=4, alpha=8.0)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_B.normal_(std=0.02)
        save_adapter(model, root / name, base_model_name_or_path=str(base))
        paths[name] = root / name
    return paths


def run_config(ws: dict, out_dir: Path, **changes) -> dict:
    cfg = {"model": {"path": str(ASSET), "compute_dtype": "fp32"},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"path": str(ws["train"]), "format": "chat", "max_seq_len": 64, "eval_path": str(ws["eval"])},
           "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "optimizer": "adamw", "lr": 2e-3,
                     "warmup_steps": 1, "save_every": 2, "eval_every": 100, "log_every": 1},
           "out": str(out_dir)}
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[section] = value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def model_copy(dest: Path, edit: Callable[[Path], None] | None = None) -> Path:
    shutil.copytree(ASSET, dest)
    if edit is not None:
        edit(dest)
    return dest


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def flip_byte(path: Path, offset: int = -3) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ bad input (promise 3)

@dataclass
class Case:
    argv: Callable[[Path, dict], list[str]]  # (case folder, ws) -> argv
    names: str  # regex the one-line message must contain: the offending file, key or flag
    setup: Callable[[Path, dict], None] = lambda w, ws: None


def _train(w: Path, ws: dict, *overrides: str, **changes) -> list[str]:
    return ["train", str(write_yaml(w / "cfg.yaml", run_config(ws, w / "out", **changes))), *overrides]


def _merge(w: Path, ws: dict, adapter=None, base=None, *extra: str) -> list[str]:
    return ["merge", "--base", str(base or ASSET), "--adapter", str(adapter or ws["adapter"]), "--out",
            str(w / "merged"), "--quiet", *extra]


def _adapter_copy(w: Path, ws: dict, edit: Callable[[Path], None]) -> Path:
    dest = shutil.copytree(ws["adapter"], w / "adapter")
    edit(dest)
    return dest


def _drop_tensor(folder: Path, needle: str) -> None:
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    for key in [k for k in tensors if needle in k]:
        del tensors[key]
    safetensors.torch.save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def _index_weight_map(value) -> Callable[[Path], None]:
    return lambda m: edit_json(m / "model.safetensors.index.json", weight_map=value)


def _escaping_index(m: Path) -> None:
    index = json.loads((m / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))


def _pickle_only(m: Path) -> None:
    for f in m.glob("model*.safetensors*"):
        f.unlink()
    (m / "pytorch_model.bin").write_bytes(b"not loaded")


BAD_INPUT = {
    # ---- train: the config
    "train: config file missing": Case(lambda w, ws: ["train", str(w / "nope.yaml")], r"nope\.yaml"),
    "train: config not YAML": Case(lambda w, ws: ["train", str(w / "c.yaml")], r"c\.yaml line",
                                   lambda w, ws: (w / "c.yaml").write_text("model: [\n  path: x\n")),
    "train: config not UTF-8": Case(lambda w, ws: ["train", str(w / "c.yaml")], r"c\.yaml.*UTF-8",
                                    lambda w, ws: (w / "c.yaml").write_bytes(b"out: \xff\xfe\n")),
    "train: unknown key (override)": Case(lambda w, ws: _train(w, ws, "lora.rank=8"), r"lora\.rank.*lora\.r"),
    "train: unknown key (file)": Case(lambda w, ws: _train(w, ws, **{"train.learning_rate": 1e-3}),
                                      r"train\.learning_rate.*train\.lr"),
    "train: wrong type": Case(lambda w, ws: _train(w, ws, "lora.r=abc"), r"lora\.r must be an integer"),
    "train: r = 0": Case(lambda w, ws: _train(w, ws, "lora.r=0"), r"lora\.r must be a positive integer"),
    "train: lr = 0": Case(lambda w, ws: _train(w, ws, "train.lr=0"), r"train\.lr must be positive"),
    "train: lr < 0": Case(lambda w, ws: _train(w, ws, **{"train.lr": -1e-4}), r"train\.lr must be positive"),
    "train: override without =": Case(lambda w, ws: _train(w, ws, "lora.r"), r"override 'lora\.r'"),
    "train: missing out": Case(lambda w, ws: _train(w, ws, **{"out": None}), r"'out'"),
    "train: unknown data.format": Case(lambda w, ws: _train(w, ws, "data.format=sharegpt"), r"data\.format"),
    "train: out is a file": Case(lambda w, ws: _train(w, ws, f"out={w / 'file'}"), r"out=.*file.*is a file",
                                 lambda w, ws: (w / "file").write_text("x")),
    "train: out holds an earlier run": Case(lambda w, ws: _train(w, ws), r"out=.*out.*resume=true",
                                            lambda w, ws: (w / "out" / "checkpoints" / "step-000002").mkdir(
                                                parents=True)),
    # ---- train: the dataset
    "train: dataset missing": Case(lambda w, ws: _train(w, ws, f"data.path={w / 'none.jsonl'}"), r"none\.jsonl"),
    "train: dataset empty": Case(lambda w, ws: _train(w, ws, f"data.path={w / 'empty.jsonl'}"),
                                 r"empty\.jsonl is empty", lambda w, ws: (w / "empty.jsonl").write_text("")),
    "train: dataset not UTF-8": Case(lambda w, ws: _train(w, ws, f"data.path={w / 'latin1.jsonl'}"),
                                     r"latin1\.jsonl is not UTF-8",
                                     lambda w, ws: (w / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')),
    "train: dataset not JSON lines": Case(lambda w, ws: _train(w, ws, f"data.path={w / 'prose.jsonl'}"),
                                          r"prose\.jsonl",
                                          lambda w, ws: (w / "prose.jsonl").write_text("just some prose\n")),
    "train: dataset of another format": Case(lambda w, ws: _train(w, ws, "data.format=alpaca"),
                                             r"train\.jsonl row 1: missing field 'instruction'"),
    "train: rows miss a field": Case(lambda w, ws: _train(w, ws, f"data.path={w / 'nomsg.jsonl'}"),
                                     r"nomsg\.jsonl row 2: missing field 'messages'",
                                     lambda w, ws: (w / "nomsg.jsonl").write_text(
                                         ws["train"].read_text().splitlines()[0] + '\n{"text": "hi"}\n')),
    "train: rows longer than the context, none left": Case(lambda w, ws: _train(w, ws, "data.max_seq_len=8"),
                                                           r"train\.jsonl: no training examples left"),
    "train: unsupported data file type": Case(lambda w, ws: _train(w, ws, f"data.path={w / 'd.txt'}"),
                                              r"d\.txt: unsupported file type",
                                              lambda w, ws: (w / "d.txt").write_text("hello\n")),
    "train: eval file missing": Case(lambda w, ws: _train(w, ws, f"data.eval_path={w / 'ev.jsonl'}"), r"ev\.jsonl"),
    # ---- train: the model
    "train: model folder missing": Case(lambda w, ws: _train(w, ws, f"model.path={w / 'nomodel'}"), r"nomodel"),
    "train: model folder without config.json": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"m: no config\.json",
        lambda w, ws: model_copy(w / "m", lambda m: (m / "config.json").unlink())),
    "train: unsupported architecture": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"m.*(config\.json|model_type).*no-such-arch",
        lambda w, ws: model_copy(w / "m", lambda m: edit_json(m / "config.json", model_type="no-such-arch"))),
    "train: model needs remote code": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"config\.json.*trust_remote_code",
        lambda w, ws: model_copy(w / "m", lambda m: edit_json(m / "config.json", model_type="my-arch",
                                                              auto_map={"AutoModelForCausalLM": "x.Y"}))),
    "train: tokenizer without chat template, chat data": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"m.*has no chat template",
        lambda w, ws: model_copy(w / "m", lambda m: (m / "chat_template.jinja").unlink())),
    "train: model config.json a list": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"m/config\.json: expected a JSON",
        lambda w, ws: model_copy(w / "m", lambda m: (m / "config.json").write_text("[1, 2]"))),
    "train: only pickle weights": Case(lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"m: only PyTorch pickle",
                                       lambda w, ws: model_copy(w / "m", _pickle_only)),
    "train: truncated base shard": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"model-00002-of-00003\.safetensors",
        lambda w, ws: model_copy(w / "m", lambda m: truncate(m / "model-00002-of-00003.safetensors"))),
    "train: index is not a mapping": Case(
        lambda w, ws: _train(w, ws, f"model.path={w / 'm'}"), r"model\.safetensors\.index\.json: not a valid",
        lambda w, ws: model_copy(w / "m", _index_weight_map(["model-00001-of-00003.safetensors"]))),
    # ---- merge
    "merge: adapter folder missing": Case(lambda w, ws: _merge(w, ws, adapter=w / "noadapter"), r"noadapter"),
    "merge: adapter for another base": Case(lambda w, ws: _merge(w, ws, adapter=ws["other_adapter"]),
                                            r"other_adapter/qlora_trainer\.json: .*different base"),
    "merge: adapter with missing keys": Case(
        lambda w, ws: _merge(w, ws, adapter=w / "adapter"),
        r"adapter/adapter_model\.safetensors: .*layers\.1\.self_attn\.v_proj has no lora_B",
        lambda w, ws: _adapter_copy(w, ws, lambda a: _drop_tensor(a, "layers.1.self_attn.v_proj.lora_B"))),
    "merge: adapter_config.json not JSON": Case(
        lambda w, ws: _merge(w, ws, adapter=w / "adapter"), r"adapter/adapter_config\.json: not valid JSON",
        lambda w, ws: _adapter_copy(w, ws, lambda a: (a / "adapter_config.json").write_text("{"))),
    "merge: adapter r = 0": Case(
        lambda w, ws: _merge(w, ws, adapter=w / "adapter"), r"adapter/adapter_config\.json: r is 0",
        lambda w, ws: _adapter_copy(w, ws, lambda a: edit_json(a / "adapter_config.json", r=0))),
    "merge: adapter weights truncated": Case(
        lambda w, ws: _merge(w, ws, adapter=w / "adapter"), r"adapter/adapter_model\.safetensors: not a readable",
        lambda w, ws: _adapter_copy(w, ws, lambda a: truncate(a / "adapter_model.safetensors"))),
    "merge: --out not empty": Case(lambda w, ws: _merge(w, ws), r"merged: --out exists and is not empty",
                                   lambda w, ws: (w / "merged").mkdir() or (w / "merged" / "x").write_text("x")),
    "merge: --out is a file": Case(lambda w, ws: _merge(w, ws), r"merged: --out exists and is a file",
                                   lambda w, ws: (w / "merged").write_text("x")),
    "merge: bad --max-shard-size": Case(lambda w, ws: _merge(w, ws, None, None, "--max-shard-size", "lots"),
                                        r"--max-shard-size 'lots'"),
    "merge: base without config.json": Case(lambda w, ws: _merge(w, ws, base=w / "m"), r"m: no config\.json",
                                            lambda w, ws: model_copy(w / "m", lambda m: (m / "config.json").unlink())),
    "merge: index shard escapes the folder": Case(lambda w, ws: _merge(w, ws, base=w / "m"),
                                                  r"index\.json: shard name '\.\./outside.*outside the model folder",
                                                  lambda w, ws: model_copy(w / "m", _escaping_index)),
    "merge: base config.json not JSON": Case(lambda w, ws: _merge(w, ws, base=w / "m"), r"m/config\.json: cannot read",
                                             lambda w, ws: model_copy(w / "m", lambda m: (m / "config.json").write_text(
                                                 "{bad"))),
    "merge: base config.json a list": Case(
        lambda w, ws: _merge(w, ws, base=w / "m"), r"m/config\.json: expected a JSON",
        lambda w, ws: model_copy(w / "m", lambda m: (m / "config.json").write_text("[1, 2]"))),
    # ---- generate
    "generate: base config.json a list": Case(
        lambda w, ws: ["generate", "--base", str(w / "m"), "--prompt", "hi"], r"m/config\.json: expected a JSON",
        lambda w, ws: model_copy(w / "m", lambda m: (m / "config.json").write_text("[1, 2]"))),
    "generate: no prompt": Case(lambda w, ws: ["generate", "--base", str(ASSET)], r"--prompt"),
    "generate: base missing": Case(lambda w, ws: ["generate", "--base", str(w / "nobase"), "--prompt", "hi"],
                                   r"nobase"),
    "generate: adapter missing": Case(lambda w, ws: ["generate", "--base", str(ASSET), "--adapter",
                                                     str(w / "noadapter"), "--prompt", "hi"], r"noadapter"),
    "generate: adapter for another base": Case(
        lambda w, ws: ["generate", "--base", str(ASSET), "--adapter", str(ws["other_adapter"]), "--prompt", "hi"],
        r"other_adapter/qlora_trainer\.json: .*different base"),
    "generate: top-p out of range": Case(lambda w, ws: ["generate", "--base", str(ASSET), "--prompt", "hi",
                                                        "--top-p", "2"], r"top_p"),
    # ---- estimate
    "estimate: model missing": Case(lambda w, ws: ["estimate", "--model", str(w / "nomodel")], r"nomodel"),
    "estimate: seq len 0": Case(lambda w, ws: ["estimate", "--model", str(ASSET), "--seq-len", "0"], r"--seq-len"),
    "estimate: unknown target": Case(lambda w, ws: ["estimate", "--model", str(ASSET), "--targets", "qkv"],
                                     r"--targets.*qkv"),
    "estimate: unsupported model_type": Case(
        lambda w, ws: ["estimate", "--model", str(w / "m")], r"config\.json: model_type 'bert'",
        lambda w, ws: (w / "m").mkdir() or (w / "m" / "config.json").write_text('{"model_type": "bert"}')),
    "estimate: config.json not JSON": Case(
        lambda w, ws: ["estimate", "--model", str(w / "m")], r"config\.json as JSON",
        lambda w, ws: (w / "m").mkdir() or (w / "m" / "config.json").write_text("{nope")),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, ws, tmp_path, capsys):
    spec = BAD_INPUT[case]
    w = tmp_path / "case"
    w.mkdir()
    spec.setup(w, ws)
    argv = spec.argv(w, ws)
    before = tree(w)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert re.search(spec.names, lines[0]), (spec.names, lines[0])
    assert tree(w) == before, f"left behind: {tree(w) - before}"  # no output folder, no temp folder


def test_a_library_message_over_several_lines_is_printed_as_one(monkeypatch, capsys):
    from qlora_trainer import estimate

    def fail(model):
        raise UserError("config.json: unsupported architecture: The checkpoint has model type `x`\n\nbut Transformers "
                        "does not recognize it.\nUpgrade.")

    monkeypatch.setattr(estimate, "read_config_json", fail)
    code, _, err = run_cli(["estimate", "--model", "x"], capsys)
    assert code == 2 and err == ("error: config.json: unsupported architecture: The checkpoint has model type `x` "
                                 "but Transformers does not recognize it. Upgrade.\n")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="nope.yaml"):
        cli.main(["--debug", "train", str(tmp_path / "nope.yaml")])


def test_bad_input_in_a_real_process_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora_trainer", "estimate", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ") and "none" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ corruption (promise 2)

@pytest.fixture(scope="module")
def finished_run(ws, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(str(write_yaml(out.parent / "cfg.yaml", run_config(ws, out, **{"train.keep_checkpoints": 3}))))
    train_mod.train(cfg, progress=False, log=lambda *_: None)
    return out


def _rewrite_state(folder: Path, edit: Callable[[dict], None]) -> None:
    """Change trainer_state.json and re-sign it, as a careful forger (or a bug) would."""
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    state.pop("state_sha256", None)
    edit(state)
    state["state_sha256"] = ckpt._state_digest(state)
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))


def _state_digit_flip(path: Path) -> None:
    text = path.read_text()
    i = text.index('"torch": [') + len('"torch": [')
    digit = text[i]
    path.write_text(text[:i] + ("1" if digit != "1" else "2") + text[i + 1:])  # still valid JSON


CHECKPOINT_CORRUPTIONS = {
    "adapter truncated": ("adapter_model.safetensors", truncate),
    "adapter bit flip": ("adapter_model.safetensors", flip_byte),
    "optimizer truncated": ("optimizer.pt", truncate),
    "optimizer bit flip": ("optimizer.pt", lambda p: flip_byte(p, -40)),
    "trainer_state truncated": ("trainer_state.json", truncate),
    "trainer_state digit changed, still JSON": ("trainer_state.json", _state_digit_flip),
    "adapter_config.json removed": ("adapter_config.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_named_and_resume_falls_back(case, finished_run, tmp_path):
    name, corrupt = CHECKPOINT_CORRUPTIONS[case]
    run = shutil.copytree(finished_run, tmp_path / "run")
    newest = ckpt.checkpoint_dir(run, 4)
    corrupt(newest / name)
    with pytest.raises(UserError, match=rf"{newest / name}|{newest / ckpt.STATE_FILE}"):
        ckpt.verify_checkpoint(newest)
    messages = []
    folder, state = ckpt.latest_checkpoint(run, warn=messages.append)
    assert folder.name == "step-000002" and state["step"] == 2
    assert len(messages) == 1 and "step-000004" in messages[0] and "falling back" in messages[0]


class _Killed(BaseException):
    pass


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(finished_run, tmp_path, monkeypatch):
    """Found by scripts/fault_injection.py: a SIGKILL inside rmtree of an old checkpoint left a step folder
    without adapter_config.json. Old checkpoints are now renamed to a temporary name before they are deleted."""
    run = shutil.copytree(finished_run, tmp_path / "run")

    def dying_rmtree(path, ignore_errors=False):
        next(Path(path).iterdir()).unlink()  # one file gone, then the process dies
        raise _Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", dying_rmtree)
    with pytest.raises(_Killed):
        ckpt._prune(run / "checkpoints", keep=1)
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000004"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step-000004")
    leftover = next((run / "checkpoints").glob(".tmp-*"))
    ended = subprocess.Popen(["true"])
    ended.wait()  # as if left by a process that has ended (a live writer's temp folder is kept: test_distributed)
    leftover.rename(leftover.with_name(leftover.name.rsplit("-", 1)[0] + f"-{ended.pid}"))
    ckpt._prune(run / "checkpoints", keep=1)  # the next run's prune removes it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004"]


def test_resume_past_a_corrupt_checkpoint_says_so_and_finishes(ws, finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")
    shutil.rmtree(run / "adapter")
    flip_byte(ckpt.checkpoint_dir(run, 4) / "optimizer.pt", -40)
    cfg = load_config(str(run / "config.yaml"), [f"out={run}", "resume=true"])
    logs = []
    train_mod.train(cfg, progress=False, log=logs.append)
    assert any("skipping checkpoint step-000004" in line and "optimizer.pt" in line for line in logs), "\n".join(logs)
    assert any("resumed from" in line and "step-000002" in line for line in logs)
    final, reference = (safetensors.torch.load_file(d / "adapter" / "adapter_model.safetensors")
                        for d in (run, finished_run))
    assert all(torch.equal(final[k], reference[k]) for k in reference)  # steps 3-4 redone, exactly


@pytest.mark.parametrize("how", ["bit flip", "truncated"])
def test_corrupt_final_adapter_is_refused_by_load_and_merge(how, ws, tmp_path):
    adapter = shutil.copytree(ws["adapter"], tmp_path / "adapter")
    (flip_byte if how == "bit flip" else truncate)(adapter / "adapter_model.safetensors")
    message = "checksum mismatch" if how == "bit flip" else "not a readable safetensors file"
    model = load_quantized(ASSET, compute_dtype="fp32", device="cpu", progress=False)
    from qlora_trainer.adapter import load_adapter_into
    from qlora_trainer.merge import merge

    with pytest.raises(UserError, match=rf"{adapter / 'adapter_model.safetensors'}: {message}"):
        load_adapter_into(model, adapter)
    assert not lora_modules(model)
    with pytest.raises(UserError, match=rf"{adapter / 'adapter_model.safetensors'}: {message}"):
        merge(ASSET, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


BASE_CORRUPTIONS = {
    "shard truncated": ("model-00002-of-00003.safetensors", truncate),
    "shard header garbage": ("model-00001-of-00003.safetensors", lambda p: flip_byte(p, 20)),
    "index truncated": ("model.safetensors.index.json", truncate),
    "index weight_map not a mapping": ("model.safetensors.index.json",
                                       lambda p: edit_json(p, weight_map=["model-00001-of-00003.safetensors"])),
    "index names a missing shard": ("model.safetensors.index.json",
                                    lambda p: p.write_text(p.read_text().replace("model-00003-of", "model-00009-of"))),
}


@pytest.mark.parametrize("case", list(BASE_CORRUPTIONS))
def test_corrupt_base_is_named_by_load_and_merge(case, ws, tmp_path):
    name, corrupt = BASE_CORRUPTIONS[case]
    base = model_copy(tmp_path / "base")
    corrupt(base / name)
    from qlora_trainer.merge import merge

    with pytest.raises(UserError, match=rf"{base / name}|{base}.*{name}"):
        load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    with pytest.raises(UserError, match=rf"{base / name}|{base}.*{name}"):
        merge(base, ws["adapter"], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------ full disk (promise 4)

def _enospc(filename: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(ws, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-000004" in str(path):
            Path(path).write_bytes(b"\0" * 1000)  # part of it got out before the disk filled
            raise _enospc(str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", str(write_yaml(tmp_path / "cfg.yaml", run_config(ws, out)))], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "step-000004: no space left on the device while writing" in err and "optimizer.pt" in err
    assert "needs about" in err and "free there" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no temp folder either
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-000002")["step"] == 2
    assert not (out / "adapter").exists()


def test_full_disk_during_a_merge_leaves_no_output(ws, tmp_path, monkeypatch, capsys):
    real_write, calls = shards.ShardWriter.write, []

    def write(self, key, tensor):
        calls.append(key)
        if len(calls) == 5:
            raise _enospc(str(self.path))
        return real_write(self, key, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    code, _, err = run_cli(["merge", "--base", str(ASSET), "--adapter", str(ws["adapter"]), "--out",
                            str(tmp_path / "merged"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "merged: no space left on the device" in err and "needs about 2." in err  # ~2 MB of fp32/bf16 tensors
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


# ------------------------------------------------------------------------------------------ one run per folder (5)

def test_a_second_run_into_a_busy_folder_is_refused(ws, tmp_path, capsys):
    out = tmp_path / "run"
    with lock.RunLock(out) as held:
        held.acquire()
        code, _, err = run_cli(["train", str(write_yaml(tmp_path / "cfg.yaml", run_config(ws, out))),
                                "--resume"], capsys)
        assert code == 2 and f"{out / '.lock'}: another training run (pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qlora_trainer.lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another training run \(pid {holder.pid} "):
            lock.check_free(out)
        with pytest.raises(UserError, match="another training run"):
            lock.RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock.check_free(out)  # the kernel dropped the dead run's lock: the stale pid in the file does not matter
    with lock.RunLock(out) as mine:
        mine.acquire()
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")


# ------------------------------------------------------------------------------------------ nothing runs code (6)

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what a malicious optimizer.pt would run on unpickling


def test_a_pickle_payload_in_optimizer_state_is_refused_without_running(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")
    folder, marker = ckpt.checkpoint_dir(run, 4), tmp_path / "payload-ran"
    with open(folder / ckpt.OPTIMIZER_FILE, "wb") as f:
        pickle.dump({"state": {}, "param_groups": [_Payload(marker)]}, f)
    _rewrite_state(folder, lambda s: s["checksums"].update({ckpt.OPTIMIZER_FILE: atomic.file_sha256(folder / "optimizer.pt")}))
    ckpt.verify_checkpoint(folder)  # the checksums were forged to match: only weights_only stands in the way
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(UserError, match=rf"{folder / 'optimizer.pt'}: cannot restore the optimizer state"):
        ckpt.load_optimizer_state(folder, optimizer)
    assert not marker.exists()
    with open(folder / ckpt.OPTIMIZER_FILE, "rb") as f:  # the payload is real: plain pickle runs it
        pickle.load(f)
    assert marker.exists()


def _model_with_its_own_code(folder: Path, model_type: str, marker: Path) -> Path:
    """A copy of the shipped model whose config.json maps the Auto classes to Python files of its own (auto_map),
    as a hub model that needs trust_remote_code does. Importing either file creates `marker`."""
    model_copy(folder, lambda m: edit_json(m / "config.json", model_type=model_type, auto_map={
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}))
    payload = f"from pathlib import Path\n\nPath({str(marker)!r}).touch()  # what malicious code would do instead\n"
    (folder / "configuration_custom.py").write_text(
        payload + f"from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
                  f"    model_type = {model_type!r}\n")
    (folder / "modeling_custom.py").write_text(
        payload + "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
                  "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return folder


def test_remote_code_is_off_by_default(ws, tmp_path, capsys):
    """A model that ships its own code is refused by the loader and by every command that loads a model, each
    naming trust_remote_code, and none of its code runs. (test_loading checks the refusal of an auto_map alone.)"""
    marker = tmp_path / "code-ran"
    folder = _model_with_its_own_code(tmp_path / "custom", "custom-llama", marker)
    with pytest.raises(UserError, match=rf"{folder / 'config.json'}: .*own Python code.*trust_remote_code"):
        load_quantized(folder, compute_dtype="fp32", device="cpu", progress=False)
    (tmp_path / "w").mkdir()
    for argv in (_train(tmp_path / "w", ws, f"model.path={folder}"), ["summary", str(folder), "--device", "cpu"],
                 ["generate", "--base", str(folder), "--prompt", "hi", "--device", "cpu"],
                 ["merge", "--base", str(folder), "--adapter", str(ws["adapter"]), "--out", str(tmp_path / "m")]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "config.json" in err and "trust_remote_code" in err, (argv, err)
    assert not (tmp_path / "w" / "out").exists() and not (tmp_path / "m").exists()
    # An architecture transformers knows, with an auto_map too: transformers' own classes, never the folder's code.
    known = _model_with_its_own_code(tmp_path / "known", "llama", marker)
    model = load_quantized(known, compute_dtype="fp32", device="cpu", progress=False)
    assert type(model).__module__.startswith("transformers.models.llama.")
    assert not marker.exists()
    # The payload is real: importing the file that auto_map names runs it.
    spec = importlib.util.spec_from_file_location("configuration_custom_probe", folder / "configuration_custom.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.exists()


@pytest.mark.slow
def test_remote_code_runs_only_when_trusted(tmp_path):
    """The other side of the test above: with trust_remote_code=True the same folder's code does run (in a fresh
    process, with transformers' module cache in tmp_path), so only the setting stood in its way."""
    marker = tmp_path / "code-ran"
    folder = _model_with_its_own_code(tmp_path / "custom", "custom-llama", marker)
    script = ("import sys; from qlora_trainer.loading import load_quantized; "
              "m = load_quantized(sys.argv[1], compute_dtype='fp32', device='cpu', trust_remote_code=True, "
              "progress=False); print(type(m).__name__)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CustomForCausalLM"] and marker.exists()


def test_adapter_as_a_pickle_is_not_loaded(ws, tmp_path):
    adapter = shutil.copytree(ws["adapter"], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(UserError, match="adapter_model.safetensors: missing.*can run code"):
        read_adapter(adapter)


# ------------------------------------------------------------------------------------------ training health (7)

def _train_with(ws, out: Path, patch_forward, monkeypatch, **changes):
    real_forward = CausalLMLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        return patch_forward(self, calls["n"], *real_forward(self, *args, **kwargs))

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    cfg = load_config(str(write_yaml(out.parent / f"{out.name}.yaml", run_config(ws, out, **changes))))
    logs = []
    result = train_mod.train(cfg, progress=False, log=logs.append)
    return result, logs


def test_a_nan_gradient_with_a_finite_loss_skips_the_update(ws, tmp_path, monkeypatch):
    seen = {}

    def poison(self, n, summed, tokens):
        if n == 3 and self.training:  # step 3: the loss is fine, one LoRA gradient becomes NaN in backward
            layer = next(iter(lora_modules(self.model).values()))
            seen["before"] = layer.lora_A.detach().clone()
            seen["layer"] = layer
            handle = []

            def to_nan(grad):
                handle.pop().remove()  # this backward only
                return torch.full_like(grad, float("nan"))

            handle.append(layer.lora_A.register_hook(to_nan))
        return summed, tokens

    result, logs = _train_with(ws, tmp_path / "run", poison, monkeypatch, **{"train.max_steps": 3,
                                                                             "train.save_every": 3})
    assert result.skipped_steps == 1 and math.isfinite(result.final_loss)
    assert any(line.startswith("step 3: non-finite") and "grad_norm=nan" in line for line in logs), logs
    assert torch.equal(seen["layer"].lora_A.detach(), seen["before"])  # the update was skipped
    saved = safetensors.torch.load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_loss_spike_is_reported(ws, tmp_path, monkeypatch):
    def spike(self, n, summed, tokens):
        return (summed * 10 if n == 4 and self.training else summed), tokens

    _, logs = _train_with(ws, tmp_path / "run", spike, monkeypatch, **{"train.max_steps": 4,
                                                                       "train.save_every": 4})
    spikes = [line for line in logs if "loss spike" in line]
    assert len(spikes) == 1 and spikes[0].startswith("step 4: loss spike"), logs
