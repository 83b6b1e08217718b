"""Kill anywhere, resume exactly (promise 1 of RELIABILITY.md), short version: one real `qlora-trainer train`
process is SIGKILLed in the middle of writing a checkpoint; the run is resumed and must end with the adapter of
an uninterrupted run, bitwise. scripts/fault_injection.py does the same for minutes, with random kill moments."""

from __future__ import annotations

import importlib.util
import sys

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
