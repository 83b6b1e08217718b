"""train.report_to: the metrics.jsonl rows reach the trackers (TensorBoard read back offline), the config as
hyperparameters, resume without duplicate steps, and one clear error for a tracker whose package is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qlora_trainer import train as train_mod
from qlora_trainer.config import build_config
from qlora_trainer.errors import UserError
from tests.helpers import ASSET, DEMO, Stop, save_then_die


def _config(out: Path, **overrides):
    flat = {"model.path": str(ASSET), "model.compute_dtype": "fp32", "data.path": str(DEMO / "train.jsonl"),
            "data.format": "chat", "data.eval_path": str(DEMO / "eval.jsonl"), "data.max_seq_len": 32,
            "lora.r": 4, "lora.alpha": 8, "train.optimizer": "adamw", "train.batch_size": 2, "train.grad_accum": 1,
            "train.max_steps": 4, "train.save_every": 2, "train.eval_every": 2, "train.log_every": 1,
            "train.report_to": "tensorboard", "out": str(out)}
    flat.update(overrides)
    return build_config(flat)


def _events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _assert_events_match_metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = _events(out)
    tags = set(acc.Tags()["scalars"])
    assert tags == {k for row in rows for k in row if k != "step"}
    for tag in tags:
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        # exact, as TensorBoard stores a scalar: float32
        assert logged == [(r["step"], float(np.float32(r[tag]))) for r in rows if tag in r], tag
    return rows


@pytest.mark.slow
def test_tensorboard_gets_every_metrics_row_and_the_config(tmp_path):
    out = tmp_path / "run"
    train_mod.train(_config(out), progress=False, log=lambda *_: None)
    rows = _assert_events_match_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval_loss" in rows[1] and "eval_loss" in rows[3]
    # the resolved config, flattened, as hyperparameters (accelerate writes hparams.yml beside them)
    import yaml

    (hparams,) = list((out / "tensorboard").glob("*/hparams.yml"))
    values = yaml.safe_load(hparams.read_text())
    assert values["lora.r"] == 4 and values["train.report_to"] == "tensorboard" and values["out"] == str(out)
    assert values["train.epochs"] == "null" and values["lora.targets"] == "all-linear"
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_a_resumed_run_logs_on_in_the_same_folder_without_duplicate_steps(tmp_path, monkeypatch):
    from qlora_trainer import checkpoint as ckpt

    out = tmp_path / "run"
    real_save = ckpt.save_checkpoint
    # the process "dies" right after its step-4 checkpoint, steps 1 to 4 logged
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die(real_save, at_step=4))
    with pytest.raises(Stop):
        train_mod.train(_config(out, **{"train.max_steps": 6}), progress=False, log=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert [e.step for e in _events(out).Scalars("loss")] == [1, 2, 3, 4]
    # pretend the step-4 checkpoint was never written: resume from step 2 redoes steps 3 and 4
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000004")
    cfg = _config(out, **{"train.max_steps": 6, "resume": True})
    train_mod.train(cfg, progress=False, log=lambda *_: None)
    rows = _assert_events_match_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the same folder, both processes


@pytest.mark.parametrize("tracker,package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_is_one_clear_error_before_loading(tmp_path, monkeypatch, tracker, package):
    monkeypatch.setitem(sys.modules, tracker, None)  # import and find_spec both fail, as where it is not installed
    loaded = []
    monkeypatch.setattr(train_mod, "load_quantized", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(train_mod, "resolve_base", lambda *a, **k: loaded.append(1))
    with pytest.raises(UserError, match=rf"train.report_to={tracker} needs the package {package}.*"
                                        rf"pip install {package}"):
        train_mod.train(_config(tmp_path / "run", **{"train.report_to": [tracker]}), progress=False,
                        log=lambda *_: None)
    assert not loaded and not (tmp_path / "run").exists()
