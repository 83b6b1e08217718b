"""Progress without a terminal (issue 17): one rule for bars (qlora_trainer.progress), plain lines in `train`'s log
with the phases and every train.log_every steps, and the latest eval loss on the bar and in those lines."""

from __future__ import annotations

import io
import re
import sys

import pytest

from qlora_trainer import cli, progress
from tests.helpers import ASSET


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
