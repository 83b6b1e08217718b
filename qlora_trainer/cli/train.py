"""`qlora-trainer train CONFIG.yaml [key=value ...]`: fine-tune into OUT (adapter, checkpoints, metrics)."""

from __future__ import annotations

import argparse
import os
import sys

from qlora_trainer.cli.options import add_config_arguments

HELP = "fine-tune: CONFIG.yaml [key=value ...] -> OUT/adapter, checkpoints, metrics"
INTERMIXED = True  # flags and key=value overrides in any order


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "lora.r=32 train.lr=1e-4 out=runs/x")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in out")
    p.add_argument("--dry-run", action="store_true", help="only render a few examples and the token statistics")


def run(args: argparse.Namespace) -> int:
    from qlora_trainer import tasks
    from qlora_trainer.cli import data
    from qlora_trainer.config import load_config
    from qlora_trainer.train import train

    cfg = load_config(args.config, list(args.overrides) + (["resume=true"] if args.resume else []))
    if args.dry_run:
        return data.run(args)
    result = train(cfg, progress=sys.stderr.isatty() or os.environ.get("QLORA_PROGRESS") == "1")
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
          + tasks.get(cfg.model.task).summary(result.eval_metrics)
          + (f", {result.skipped_steps} skipped (non-finite)" if result.skipped_steps else "")
          + f"\nadapter: {result.adapter}\nmetrics: {result.metrics}, plot: {result.plot}")
    return 0
