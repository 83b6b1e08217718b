"""Training checkpoints that are either complete or absent, and the exact state needed to resume.

    checkpoints/step-000200/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout, loadable on its own)
        optimizer.pt                                       optimizer state, tensors only (torch.load weights_only)
        trainer_state.json                                 step, RNG states, counters, sha256 of every file above

A checkpoint is written through atomic.write_folder: a folder named step-NNNNNN exists only once it is whole. On
resume we trust a folder only if every checksum matches; otherwise we say so and fall back to the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qlora_trainer import atomic
from qlora_trainer.errors import UserError
from qlora_trainer.names import CHECKPOINTS_DIR

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
STEP_PREFIX = "step-"


# ------------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Every random source training touches, as JSON (no pickles: torch.load(weights_only) refuses numpy's)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------------------ write / read

def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"{STEP_PREFIX}{step:06d}"


def save_checkpoint(out: Path, step: int, write_adapter: Callable[[Path], None], optimizer: torch.optim.Optimizer,
                    state: dict, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then delete all but the newest `keep` complete ones."""
    final = checkpoint_dir(out, step)

    def write(folder: Path) -> None:
        write_adapter(folder)  # adapter_config.json + adapter_model.safetensors (+ qlora_trainer.json)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        checksums = {name: atomic.file_sha256(folder / name) for name in files}
        content = {**state, "step": step, "checksums": checksums}
        (folder / STATE_FILE).write_text(json.dumps({**content, "state_sha256": _state_digest(content)}),
                                         encoding="utf-8")

    atomic.write_folder(final, write, expected_bytes=_checkpoint_bytes(optimizer))
    _prune(final.parent, keep)
    return final


def _state_digest(content: dict) -> str:
    """sha256 of the trainer state itself (RNG states, counters, the other files' checksums): a flipped digit in
    trainer_state.json that still parses as JSON is caught too."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _checkpoint_bytes(optimizer: torch.optim.Optimizer) -> int:
    """About what a checkpoint takes on disk: the trained tensors (fp32 adapter) and the optimizer's state."""
    params = sum(p.numel() * 4 for group in optimizer.param_groups for p in group["params"])
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return params + state + (64 << 10)  # + JSON files (RNG states, config)


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for old in steps[:-keep]:
        # Rename first, then delete: a run killed mid-rmtree must not leave a half-deleted step-N folder (found
        # by scripts/fault_injection.py). The renamed leftover is a stale temp folder, removed by the next run.
        doomed = old.with_name(f"{atomic.TMP_PREFIX}delete-{old.name}-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for stale in folder.iterdir():  # left by a run killed mid-write
        if atomic.is_stale_temp(stale):
            shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(folder: Path) -> dict:
    """The trainer state of a complete, uncorrupted checkpoint; UserError naming the bad file otherwise."""
    state_file = folder / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        checksums = state["checksums"]
        step = int(state["step"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{state_file}: unreadable trainer state ({err!r})") from None
    if not isinstance(checksums, dict):
        raise UserError(f"{state_file}: unreadable trainer state (checksums is not a mapping)")
    recorded = state.pop("state_sha256", None)  # absent in checkpoints written before it was added
    if recorded is not None and recorded != _state_digest(state):
        raise UserError(f"{state_file}: checksum mismatch (the trainer state is corrupt or was changed)")
    if folder.name != f"{STEP_PREFIX}{step:06d}":  # also a folder named step-<not a number>: no crash, a message
        raise UserError(f"{state_file}: says step {step} but lives in {folder.name}")
    for name, digest in checksums.items():
        file = folder / name
        if not file.is_file():
            raise UserError(f"{file}: missing from the checkpoint")
        if atomic.file_sha256(file) != digest:
            raise UserError(f"{file}: checksum mismatch (the file is corrupt or was changed)")
    return state


def latest_checkpoint(out: Path, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    steps = (p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for candidate in sorted(steps, reverse=True):
        try:
            return candidate, verify_checkpoint(candidate)
        except UserError as err:
            warn(f"skipping checkpoint {candidate.name}: {err}; falling back to the previous one")
    return None


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    path = folder / OPTIMIZER_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing runs
        optimizer.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        raise UserError(f"{path}: cannot restore the optimizer state ({err})") from None
