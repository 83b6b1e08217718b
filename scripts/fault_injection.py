"""Kill `qlora-trainer train` anywhere, resume, repeat: the final adapter must equal an uninterrupted run's, bitwise.

Each round trains the shipped tiny model (CPU, fp32, a checkpoint every step) into a fresh folder. Every launch
is killed with SIGKILL at a moment picked at random from three kinds, until one launch finishes:

    random     after a random delay (loading, a step, a checkpoint, the final adapter, anywhere)
    mid-write  the instant a checkpoint's temporary folder appears (mid-way through writing a checkpoint)
    renamed    the instant a new step-NNNNNN folder appears (between the rename and the pruning of old ones)

After every kill, every checkpoint folder present must verify (checksums, trainer state); the next launch
resumes with --resume. At the end the adapter is compared with the reference run's, tensor by tensor.

    python scripts/fault_injection.py --minutes 5            # prints rounds, kills, steps redone, identical yes/no
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_trainer import checkpoint as ckpt  # noqa: E402

KINDS = ("random", "mid-write", "renamed")


def make_workspace(root: Path, max_steps: int = 8) -> Path:
    """Small data and a config whose runs take seconds; returns the config path (out= is given per launch)."""
    root.mkdir(parents=True, exist_ok=True)
    demo = REPO / "data" / "demo"
    (root / "train.jsonl").write_text("\n".join((demo / "train.jsonl").read_text().splitlines()[:32]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((demo / "eval.jsonl").read_text().splitlines()[:4]) + "\n")
    config = {
        "model": {"path": str(REPO / "assets" / "tiny-llama"), "compute_dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must be restored too
        "data": {"path": str(root / "train.jsonl"), "format": "chat", "max_seq_len": 64,
                 "eval_path": str(root / "eval.jsonl")},
        "train": {"max_steps": max_steps, "batch_size": 4, "grad_accum": 2, "optimizer": "adamw", "lr": 2e-3,
                  "warmup_steps": 2, "save_every": 1, "eval_every": 4, "log_every": 1, "keep_checkpoints": 2},
        "out": str(root / "unused"),
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def launch(config: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "qlora_trainer", "train", str(config), f"out={out}",
                                 "--resume"], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # a killed run's log is kept


def _temp_folders(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    # .tmp-step-N-*: a checkpoint being written (not .tmp-delete-*: an old one being pruned)
    return [p for p in folder.iterdir() if p.name.startswith(".tmp-step-")] if folder.is_dir() else []


def _step_folders(out: Path) -> set[str]:
    folder = out / "checkpoints"
    return {p.name for p in folder.iterdir() if p.name.startswith(ckpt.STEP_PREFIX)} if folder.is_dir() else set()


def kill_when(proc: subprocess.Popen, out: Path, kind: str, delay: float, min_checkpoints: int = 0) -> str | None:
    """Wait for the moment `kind` names (once `min_checkpoints` checkpoints exist), then SIGKILL. Returns what was
    interrupted, or None if the run finished first."""
    start, before = time.monotonic(), _step_folders(out)
    while proc.poll() is None:
        if len(_step_folders(out)) < min_checkpoints:
            time.sleep(0.0005)
            continue
        if kind == "random" and time.monotonic() - start >= delay:
            what = "mid-write" if _temp_folders(out) else "random"
        elif kind == "mid-write" and _temp_folders(out):
            what = "mid-write"
        elif kind == "renamed" and _step_folders(out) - before:
            what = "renamed"
        else:
            time.sleep(0.0005)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return what
    return None


def logged_step(out: Path) -> int:
    """The last step the run finished (metrics.jsonl has a row per step with log_every=1)."""
    path = out / "metrics.jsonl"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass  # a line cut by the kill
    return max(steps)


def check_checkpoints(out: Path) -> int:
    """Every step-* folder present must verify; returns how many there are."""
    folders = sorted((out / "checkpoints").glob(f"{ckpt.STEP_PREFIX}*")) if (out / "checkpoints").is_dir() else []
    for folder in folders:
        ckpt.verify_checkpoint(folder)  # raises UserError naming the bad file
    return len(folders)


def adapters_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and bool((x[k] == y[k]).all()) for k in x)


@dataclass
class Tally:
    rounds: int = 0
    identical: int = 0
    kills: int = 0
    by_kind: dict = field(default_factory=lambda: {"random": 0, "mid-write": 0, "renamed": 0})
    steps_redone: int = 0
    checkpoints_verified: int = 0
    launches: int = 0


def one_round(config: Path, out: Path, reference: Path, rng: random.Random, tally: Tally, run_seconds: float,
              max_kills: int = 6) -> bool:
    log = out.parent / f"{out.name}.log"
    kills_this_round = 0
    while True:
        before = log.read_text() if log.exists() else ""
        proc = launch(config, out, log)
        tally.launches += 1
        kind = rng.choice(KINDS) if kills_this_round < max_kills else "none"
        delay = rng.uniform(0.2, 1.0) * _last_full_launch.get("seconds", run_seconds)
        started = time.monotonic()
        if kind == "none":  # enough kills this round: let it finish
            proc.wait()
            what = None
        else:
            what = kill_when(proc, out, kind, delay)
        text = log.read_text()[len(before):]
        resumed = re.search(r"resumed from .* \(step (\d+)\)", text)
        if what is None:  # it finished
            if not resumed:  # a launch from step 0: how long a whole run takes on this machine now
                _last_full_launch["seconds"] = time.monotonic() - started
            if proc.returncode != 0:
                raise RuntimeError(f"launch failed (exit {proc.returncode}):\n{text}")
            if resumed:
                tally.steps_redone += max(0, tally_last_reached.get(out, 0) - int(resumed.group(1)))
            break
        tally.kills += 1
        tally.by_kind[what] += 1
        kills_this_round += 1
        if resumed:
            tally.steps_redone += max(0, tally_last_reached.get(out, 0) - int(resumed.group(1)))
        tally_last_reached[out] = logged_step(out)
        tally.checkpoints_verified += check_checkpoints(out)
    same = adapters_equal(out / "adapter", reference / "adapter")
    tally.rounds += 1
    tally.identical += same
    return same


tally_last_reached: dict[Path, int] = {}
_last_full_launch: dict[str, float] = {}  # the machine's load changes: random delays follow the latest timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="run rounds for this long (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="or exactly this many rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fault-injection-"))
    config = make_workspace(root, args.max_steps)
    t0 = time.monotonic()
    reference = root / "reference"
    ref = launch(config, reference, root / "reference.log")
    if ref.wait() != 0:
        print((root / "reference.log").read_text())
        return 1
    run_seconds = time.monotonic() - t0
    print(f"reference run: {args.max_steps} steps in {run_seconds:.1f}s; killing runs for "
          f"{f'{args.rounds} rounds' if args.rounds else f'{args.minutes:g} minutes'}", flush=True)

    tally, deadline, failed = Tally(), time.monotonic() + 60 * args.minutes, []
    while (tally.rounds < args.rounds) if args.rounds else (time.monotonic() < deadline):
        out = root / f"round-{tally.rounds + 1:03d}"
        same = one_round(config, out, reference, rng, tally, run_seconds)
        print(f"round {tally.rounds}: kills so far {tally.kills} {tally.by_kind}, adapter identical: "
              f"{'yes' if same else 'NO'}", flush=True)
        if not same:
            failed.append(out)
        elif not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    print(f"rounds: {tally.rounds}\nlaunches: {tally.launches}\nkills: {tally.kills} "
          f"(random {tally.by_kind['random']}, mid-checkpoint-write {tally.by_kind['mid-write']}, "
          f"right after a checkpoint rename {tally.by_kind['renamed']})\nsteps redone: {tally.steps_redone}\n"
          f"checkpoint folders verified after kills: {tally.checkpoints_verified}\n"
          f"adapters identical: {'yes' if not failed else 'NO'} ({tally.identical}/{tally.rounds})")
    if failed:
        print("differing runs kept in:", *failed, sep="\n  ")
    elif not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
