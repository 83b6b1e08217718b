"""`qlora-trainer train CONFIG.yaml [key=value ...]`: fine-tune into OUT (adapter, checkpoints, metrics)."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal

from qlora_trainer.cli.options import add_config_arguments
from qlora_trainer.names import ADAPTER_DIR

HELP = "fine-tune: CONFIG.yaml [key=value ...] -> OUT/adapter, checkpoints, metrics"
INTERMIXED = True  # flags and key=value overrides in any order


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "lora.r=32 train.lr=1e-4 out=runs/x")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in out")
    p.add_argument("--dry-run", action="store_true", help="only render a few examples and the token statistics")


def run(args: argparse.Namespace) -> int:
    from qlora_trainer import progress, tasks
    from qlora_trainer.cli import data
    from qlora_trainer.config import load_config
    from qlora_trainer.distributed import World
    from qlora_trainer.stopping import Interrupted, StopRequest
    from qlora_trainer.train import train

    cfg = load_config(args.config, list(args.overrides) + (["resume=true"] if args.resume else []))
    if args.dry_run:
        return data.run(args)
    stop = StopRequest()  # SIGINT/SIGTERM: finish the step, save, say how to go on (a second one: exit at once)
    try:
        with _handling(stop, signal.SIGINT, signal.SIGTERM):
            result = train(cfg, progress=progress.bars(), stop=stop)
    except Interrupted as stopped:
        if World.from_env().is_main:  # under accelerate launch the main process speaks for the run
            print(_interrupted_message(stopped, args), flush=True)
        return 128 + stopped.signum  # 130 for SIGINT, 143 for SIGTERM: the shell's convention
    if not World.from_env().is_main:
        return 0
    metrics = (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "") \
        + tasks.get(cfg.model.task).summary(result.eval_metrics) \
        + (f", {result.skipped_steps} skipped (non-finite)" if result.skipped_steps else "")
    if result.already_complete:
        print(f"already complete: the run in {result.out} finished at step {result.steps}, "
              f"final loss {result.final_loss:.4f}{metrics}; nothing was trained "
              f"(raise train.max_steps to train on, or choose another out to start a new run)")
    else:
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}{metrics}")
    print(f"adapter: {result.adapter}\nmetrics: {result.metrics}, plot: {result.plot}")
    return 0


@contextlib.contextmanager
def _handling(handler, *signums: int):
    """`handler` for these signals while the block runs, the previous handlers after it (only the main thread can
    set handlers: elsewhere, e.g. a notebook's worker thread, the defaults stay)."""
    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _interrupted_message(stopped, args: argparse.Namespace) -> str:
    """What was saved, and the exact command that goes on from it."""
    if stopped.checkpoint is None:
        return f"interrupted ({stopped.signal_name}) before the first step: nothing to save"
    command = ["qlora-trainer", "train", args.config, *args.overrides, "--resume"]
    return (f"interrupted ({stopped.signal_name}) after step {stopped.step} of {stopped.max_steps}: saved "
            f"{stopped.checkpoint} and the adapter {stopped.out / ADAPTER_DIR}\n"
            f"to go on: {shlex.join(command)}")
