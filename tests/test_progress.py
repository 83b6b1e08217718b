"""Progress without a terminal (issue 17): one rule for bars (qlora_trainer.progress), plain lines in `train`'s log
with the phases and every train.log_every steps, and the latest eval loss on the bar and in those lines."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_trainer import cli, progress
from qlora_trainer import train as train_mod
from qlora_trainer.config import build_config
from tests.helpers import ASSET, DEMO, REPO


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("setting, stderr_tty, stdout_tty, wanted", [
    (None, True, True, True),  # a terminal
    (None, False, False, False),  # nohup, CI, a scheduler, `2>&1 | tee`
    (None, True, False, False),  # `| tee log`, `> log`: the log would get nothing between the phases
    (None, False, True, False),  # `2> log`
    ("1", False, False, True),
    ("0", True, True, False),
    ("", True, True, True),
])
def test_one_rule_for_bars(monkeypatch, setting, stderr_tty, stdout_tty, wanted):
    if setting is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, setting)
    monkeypatch.setattr(sys, "stderr", _Stream(stderr_tty))
    monkeypatch.setattr(sys, "stdout", _Stream(stdout_tty))
    assert progress.bars() is wanted


def test_training_line_and_phase():
    lines = []
    with progress.phase("tokenizing x.jsonl", lines.append) as phase:
        phase["detail"] = "12 rows"
    assert lines[0] == "tokenizing x.jsonl ..."
    assert re.fullmatch(r"tokenizing x\.jsonl: 12 rows, done in \d+\.\ds", lines[1])
    line = progress.training_line(20, 500, {"loss": "1.2345", "eval_loss": "1.1000"}, 312.4)
    assert line == "step 20/500 (4%): loss 1.2345, eval_loss 1.1000, ETA 5m12s"
    assert progress.duration(3725) == "1h02m" and progress.duration(7.2) == "7s"


@pytest.mark.parametrize("setting, bar", [("0", False), ("1", True)])
def test_other_commands_draw_bars_by_the_same_rule(setting, bar, tmp_path, monkeypatch, capsys):
    """summary and merge used to draw their bars into any stderr, a log file included; QLORA_PROGRESS=0 could not
    turn them off."""
    monkeypatch.setenv(progress.ENV, setting)
    assert cli.main(["summary", str(ASSET), "--device", "cpu"]) == 0
    assert ("loading NF4" in capsys.readouterr().err) is bar


def _write_config(root: Path, **train) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("\n".join((DEMO / "train.jsonl").read_text().splitlines()[:32]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((DEMO / "eval.jsonl").read_text().splitlines()[:4]) + "\n")
    config = {"model": {"path": str(ASSET), "compute_dtype": "fp32"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"path": str(root / "train.jsonl"), "format": "chat", "max_seq_len": 64,
                       "eval_path": str(root / "eval.jsonl")},
              "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "optimizer": "adamw", "lr": 2e-3,
                        "warmup_steps": 1, "save_every": 100, "eval_every": 2, "log_every": 1, **train},
              "out": str(root / "unused")}
    (root / "config.yaml").write_text(json.dumps(config))
    return root / "config.yaml"


@pytest.mark.slow
def test_train_into_a_pipe_logs_its_phases_and_a_line_per_log_every_steps(tmp_path):
    config = _write_config(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    proc = subprocess.run([sys.executable, "-m", "qlora_trainer", "train", str(config), f"out={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    phases = ["tokenizing", "loading the model", "training steps 1 to 4", "saving the adapter"]
    for phase in phases:
        assert re.search(rf"^{phase}.* \.\.\.$", out, re.M), (phase, out)
        assert re.search(rf"^{phase}.*: (.*, )?done in \d+\.\ds$", out, re.M), (phase, out)
    assert re.search(r"^tokenizing .*train\.jsonl: 36 rows, done in", out, re.M), out  # 32 train + 4 eval rows
    starts = [re.search(rf"^{phase}", out, re.M).start() for phase in phases]
    assert starts == sorted(starts), out
    lines = re.findall(r"^step (\d+)/4 \(\d+%\): (.*)$", out, re.M)
    assert [int(step) for step, _ in lines] == [1, 2, 3, 4], out
    for step, fields in lines:
        assert re.search(r"loss \d+\.\d{4}, lr \d\.\d\de-\d\d, tok/s \d+, mem \d+\.\d\dGB", fields), fields
        assert re.search(r", ETA \d+s$|, ETA \d+m\d\ds$", fields), fields
        assert ("eval_loss" in fields) is (int(step) >= 2)  # the latest eval, from the first one on
    evals = [json.loads(r)["eval_loss"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in r]
    assert f"eval_loss {evals[-1]:.4f}" in lines[-1][1]
    assert "\r" not in proc.stderr and "training:" not in proc.stderr  # no bar in a log
    assert out.rstrip().splitlines()[-3].startswith("done: 4 steps")


class _RecordingBar:
    """tqdm's stand-in: records every set_postfix."""
    postfixes: list[dict] = []

    def __init__(self, iterable, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        _RecordingBar.postfixes.append(dict(ordered_dict or {}, **kwargs))

    def close(self):
        pass


@pytest.mark.slow
def test_the_bar_shows_the_latest_eval_loss(tmp_path, monkeypatch):
    cfg = build_config({"model.path": str(ASSET), "model.compute_dtype": "fp32", "data.path": str(DEMO / "train.jsonl"),
                        "data.format": "chat", "data.eval_fraction": 0.01, "data.max_seq_len": 64, "lora.r": 4,
                        "train.optimizer": "adamw", "train.batch_size": 4, "train.grad_accum": 1,
                        "train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1, "train.warmup_steps": 1,
                        "out": str(tmp_path / "run")})
    monkeypatch.setattr(train_mod, "tqdm", _RecordingBar)
    _RecordingBar.postfixes = []
    result = train_mod.train(cfg, progress=True, log=lambda *_: None)
    shown = _RecordingBar.postfixes
    assert len(shown) == 4 and all({"loss", "lr", "tok/s", "mem"} <= set(p) for p in shown)
    assert "eval_loss" not in shown[0]
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert [p["eval_loss"] for p in shown[1:]] == [f"{evals[0]:.4f}", f"{evals[0]:.4f}", f"{evals[1]:.4f}"]


class _FlushRecorder(io.StringIO):
    """A stdout that records where the text stood at every flush."""

    def __init__(self):
        super().__init__()
        self.flushed_at: list[int] = []

    def flush(self):
        self.flushed_at.append(len(self.getvalue()))
        super().flush()


@pytest.mark.slow
def test_plain_lines_are_flushed_as_they_are_written(tmp_path, monkeypatch):
    """Under nohup or a scheduler stdout is a block-buffered file: each progress line must be flushed when written,
    not when the buffer fills or the run ends."""
    cfg = build_config({"model.path": str(ASSET), "model.compute_dtype": "fp32", "data.path": str(DEMO / "train.jsonl"),
                        "data.format": "chat", "data.eval_fraction": 0.01, "data.max_seq_len": 64, "lora.r": 4,
                        "train.optimizer": "adamw", "train.batch_size": 4, "train.grad_accum": 1,
                        "train.max_steps": 3, "train.eval_every": 100, "train.log_every": 1, "train.warmup_steps": 1,
                        "out": str(tmp_path / "run")})
    recorder = _FlushRecorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    train_mod.train(cfg, progress=False)  # the default log, as the CLI runs it
    text = recorder.getvalue()
    ends = [m.end() for m in re.finditer(r"^(step \d+/3 |training steps ).*\n", text, re.M)]
    assert len(ends) == 5, text  # "training steps 1 to 3 ...", three step lines, "... done in"
    assert set(ends) <= set(recorder.flushed_at)
