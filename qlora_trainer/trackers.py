"""Experiment trackers (train.report_to) through accelerate's tracker integration.

check_installed(names) runs before anything heavy loads: one UserError naming the pip package of each missing one.
make_trackers builds accelerate's tracker objects (given to Accelerator(log_with=...)) with these places on disk:

    tensorboard   OUT/tensorboard/ (event files; the hyperparameters in a timestamped subfolder, as accelerate does)
    wandb         project "qlora-trainer", run named after OUT, its local files in OUT/wandb/ (WANDB_MODE=offline
                  keeps them there)
    mlflow        experiment "qlora-trainer", run named after OUT, in MLflow's tracking store (MLFLOW_TRACKING_URI;
                  unset: OUT/mlruns)

A resumed run logs into the same places from its checkpoint's step on: TensorBoard's purge_step hides what the
interrupted process logged after that step, so no step appears twice.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qlora_trainer.errors import UserError
from qlora_trainer.names import TENSORBOARD_DIR, TRACKER_PACKAGES

PROJECT = "qlora-trainer"  # the wandb project and the mlflow experiment


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(names: list[str]) -> None:
    """A UserError naming the pip package of every tracker in `names` whose package is not importable."""
    missing = [n for n in names if not _installed(n)]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n] for n in missing)
        raise UserError(f"train.report_to={','.join(missing)} needs the package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(TRACKER_PACKAGES[n] for n in missing)}, not installed: pip install {packages} "
                        f"(or pip install 'qlora-trainer[trackers]'), or set train.report_to=none")


def make_trackers(names: list[str], out: Path) -> list:
    """accelerate's tracker objects for `names` (not started), writing where the module docstring says."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    made = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardTracker(TENSORBOARD_DIR, out))
        elif name == "wandb":
            made.append(WandBTracker(PROJECT, name=out.name, dir=str(out)))
        elif name == "mlflow":
            if "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
            made.append(MLflowTracker(PROJECT, run_name=out.name))
    return made


def resume_at(made: list, start_step: int) -> None:
    """Before the trackers start: a run resumed at `start_step` (> 0) has TensorBoard purge the events the earlier
    process logged after that step (SummaryWriter's purge_step), so the redone steps are not there twice."""
    from accelerate.tracking import TensorBoardTracker

    for tracker in made:
        if start_step and isinstance(tracker, TensorBoardTracker):
            tracker.init_kwargs["purge_step"] = start_step + 1  # rows are logged at step i + 1 for 0-based i


def flat_config(tree: dict, prefix: str = "") -> dict:
    """{'lora': {'r': 8, 'targets': [a, b]}} -> {'lora.r': 8, 'lora.targets': 'a,b'}: plain values for every tracker
    (None -> 'null', a list -> comma-joined)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
