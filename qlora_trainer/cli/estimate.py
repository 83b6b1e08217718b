"""`qlora-trainer estimate --model DIR|config.json [--seq-len N ...]`: GPU memory of a run, from config.json alone."""

from __future__ import annotations

import argparse

from qlora_trainer.errors import UserError
from qlora_trainer.names import ALL_LINEAR, DTYPE_BYTES, OPTIMIZERS

HELP = "GPU memory a run needs, from config.json alone"
FLAGS = {"compute_dtype": "--dtype"}  # RunSettings fields whose flag is not spelled like the field


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qlora_trainer.estimate import RunSettings  # plain Python, no torch: cheap to import

    d = RunSettings()
    p.add_argument("--model", required=True, help="model folder, its config.json, or a hub id in the local cache")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA r")
    p.add_argument("--targets", default=ALL_LINEAR, help=f"{ALL_LINEAR} or comma-separated names, e.g. q_proj,v_proj")
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    p.add_argument("--loss-chunk-size", type=int, default=d.loss_chunk_size)
    p.add_argument("--dtype", default=d.compute_dtype, choices=list(DTYPE_BYTES), help="compute dtype")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--gpu-gib", type=float, default=80.0,
                   help="GPU memory in GiB to fit (an 'H100 80GB' has about 79.1 GiB)")


def run(args: argparse.Namespace) -> int:
    from qlora_trainer.estimate import (RunSettings, estimate_memory, format_table, max_batch_that_fits,
                                        max_seq_len_that_fits, read_config_json, shape_from_config)

    if args.gpu_gib <= 0:
        raise UserError(f"--gpu-gib must be positive, got {args.gpu_gib}")
    config, path = read_config_json(args.model)
    shape = shape_from_config(config, str(path))
    run = RunSettings(seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                      targets=args.targets, optimizer=args.optimizer, loss_chunk_size=args.loss_chunk_size,
                      compute_dtype=args.dtype, lora_dropout=args.lora_dropout)
    print(format_table(estimate_memory(shape, run), shape, run))
    seq = max_seq_len_that_fits(args.gpu_gib, shape, run)
    batch = max_batch_that_fits(args.gpu_gib, shape, run)
    note = (f" (beyond the model's max_position_embeddings, {shape.max_positions:,})"
            if isinstance(shape.max_positions, int) and seq > shape.max_positions else "")
    print(f"fits in {args.gpu_gib:g} GiB: seq len up to {seq:,} at batch {run.batch_size}{note}; "
          f"batch up to {batch:,} at seq len {run.seq_len:,}")
    return 0
