"""Stopping a training run cleanly: a signal asks, the run finishes its step, saves, and says how to go on."""

from __future__ import annotations

import signal
from pathlib import Path


class StopRequest:
    """Asks a Run to stop after the step in progress. It is a signal handler: cli/train.py installs it for SIGINT and
    SIGTERM. The first signal during training asks; a second one, or one before training started (loading, nothing
    to save yet), raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self.training = False  # set by Run.fit while its loop runs

    def __call__(self, signum: int, frame=None) -> None:
        if self.signum is not None or not self.training:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    """A run stopped by a StopRequest after `step` steps, its work saved in `checkpoint` (None: no step to save)."""

    def __init__(self, out: Path, step: int, max_steps: int, signum: int, checkpoint: Path | None):
        self.out, self.step, self.max_steps, self.signum, self.checkpoint = out, step, max_steps, signum, checkpoint
        super().__init__(f"{self.signal_name} after step {step} of {max_steps}")

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"
