"""Kill anywhere, resume exactly (promise 1 of RELIABILITY.md), short version: one real `qlora-trainer train`
process is SIGKILLed in the middle of writing a checkpoint; the run is resumed and must end with the adapter of
an uninterrupted run, bitwise. scripts/fault_injection.py does the same for minutes, with random kill moments.
A run stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler) saves the step it was on and resumes exactly too."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import cli
from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("fault_injection", REPO / "scripts" / "fault_injection.py")
fi = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fault_injection", fi)  # dataclasses look their module up there
_spec.loader.exec_module(fi)


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_resume_gives_the_uninterrupted_adapter(tmp_path, capsys):
    config = fi.make_workspace(tmp_path, max_steps=3)
    killed = tmp_path / "killed"
    proc = fi.launch(config, killed, tmp_path / "killed.log")
    what = fi.kill_when(proc, killed, "mid-write", delay=0, min_checkpoints=1)  # while writing step 2's
    assert what == "mid-write", (tmp_path / "killed.log").read_text()
    assert fi._temp_folders(killed), "the kill should leave a half-written checkpoint behind"
    fi.check_checkpoints(killed)  # whatever step-* folders exist are complete
    assert not (killed / "adapter").exists()

    # The resume and the reference run in this process: the same threads, the same kernels.
    assert cli.main(["train", str(config), f"out={killed}", "--resume"]) == 0
    assert f"resumed from {ckpt.checkpoint_dir(killed, 1)} (step 1)" in capsys.readouterr().out
    assert not fi._temp_folders(killed)  # the half-written folder was cleaned up
    reference = tmp_path / "reference"
    assert cli.main(["train", str(config), f"out={reference}"]) == 0
    assert fi.adapters_equal(killed / "adapter", reference / "adapter")


def _signal_workspace(root: Path) -> Path:
    """fi's workspace with no regular checkpoint before the end: what a stopped run keeps, it saved on the signal."""
    config = fi.make_workspace(root, max_steps=8)
    settings = json.loads(config.read_text())
    settings["train"].update(save_every=100, eval_every=4, log_every=1)
    config.write_text(json.dumps(settings))
    return config


@pytest.mark.slow
def test_sigint_and_sigterm_save_the_step_print_the_resume_command_and_resume_exactly(tmp_path, capsys):
    config = _signal_workspace(tmp_path)
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # both at once: each waits for its own first step
        out = tmp_path / sig.name
        runs[sig] = out, subprocess.Popen([sys.executable, "-m", "qlora_trainer", "train", str(config), f"out={out}"],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for sig, (out, proc) in runs.items():
        while fi.logged_step(out) == 0 and proc.poll() is None:  # until training has started
            time.sleep(0.01)
        proc.send_signal(sig)
    commands = {}
    for sig, (out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 128 + sig, (sig, proc.returncode, stdout, stderr)  # 130, 143
        step = fi.logged_step(out)
        assert 0 < step < 8, stdout
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{step:06d}"]
        assert fi.adapters_equal(out / "adapter", ckpt.checkpoint_dir(out, step))
        assert f"interrupted ({sig.name}) after step {step} of 8: saved {ckpt.checkpoint_dir(out, step)}" in stdout
        command = f"qlora-trainer train {config} out={out} --resume"
        assert f"to go on: {command}" in stdout, stdout
        commands[sig] = shlex.split(command)[1:]

    # The resumes and the reference run in this process: the same threads, the same kernels.
    reference = tmp_path / "reference"
    assert cli.main(["train", str(config), f"out={reference}"]) == 0
    for sig, argv in commands.items():
        assert cli.main(argv) == 0
        assert fi.adapters_equal(runs[sig][0] / "adapter", reference / "adapter"), sig
