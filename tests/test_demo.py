"""scripts/demo.py starts a new run each time (issue 17): `demo.py train.max_steps=100` after a 500-step demo used to
resume the old run quietly and report "trained 100 steps in 0.0 min" beside the 500-step result. Training and the
before/after measurements are stubbed here: what is checked is what main() hands to train."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from qlora_trainer.config import load_config, save_config
from qlora_trainer.errors import UserError
from qlora_trainer.train import TrainResult
from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("demo", demo)
_spec.loader.exec_module(demo)


@pytest.fixture
def stubbed(monkeypatch):
    """demo.main without the model: train records the config it gets and what `out` held at that moment, then
    leaves in `out` what a finished run leaves (config.yaml, its last checkpoint, the adapter)."""
    seen = {}

    def train(cfg, **kwargs):
        out = Path(cfg.out)
        seen.clear()
        seen.update(resume=cfg.resume, max_steps=cfg.train.max_steps,
                    held=sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else [])
        (out / "checkpoints" / f"step-{cfg.train.max_steps:06d}").mkdir(parents=True, exist_ok=True)
        (out / "adapter").mkdir(exist_ok=True)
        save_config(cfg, out / "config.yaml")
        return TrainResult(out, cfg.train.max_steps, 1.0, 1.0, 0)

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(demo, "build_datasets", lambda *args, **kwargs: ([], [], None))
    monkeypatch.setattr(demo, "load_quantized", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "load_adapter_into", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "measure", lambda *args, **kwargs: (0.0, 3.0))
    return seen


def test_a_second_demo_starts_a_new_run_and_says_so(tmp_path, stubbed, capsys):
    out = tmp_path / "tiny"
    assert demo.main(["train.max_steps=500", f"out={out}"]) == 0
    capsys.readouterr()
    assert demo.main(["train.max_steps=100", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert stubbed == {"resume": False, "max_steps": 100, "held": []}  # nothing of the 500-step run is left
    assert f"{out} holds an earlier demo run (newest checkpoint step-000500): removing it" in printed
    assert "trained 100 steps in" in printed


def test_the_demo_resumes_only_when_asked(tmp_path, stubbed):
    out = tmp_path / "tiny"
    assert demo.main(["train.max_steps=500", f"out={out}"]) == 0
    assert demo.main(["train.max_steps=600", f"out={out}", "resume=true"]) == 0
    assert stubbed["resume"] is True and "checkpoints/step-000500" in stubbed["held"]


def test_the_demo_removes_nothing_but_its_own_runs(tmp_path, stubbed):
    out = tmp_path / "mine"
    assert demo.main(["train.max_steps=500", f"out={out}"]) == 0
    cfg = load_config(str(out / "config.yaml"))
    cfg.data.path = str(tmp_path / "my-data.jsonl")  # a run of the user's own, in the folder the demo is given
    save_config(cfg, out / "config.yaml")
    stubbed.clear()
    with pytest.raises(UserError, match=r"out=.*mine holds a run that is not this demo's.*choose another out="):
        demo.main([f"out={out}"])
    assert (out / "checkpoints" / "step-000500").is_dir() and not stubbed
