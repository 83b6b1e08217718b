"""`qlora-trainer estimate (CONFIG.yaml [key=value ...] | --model DIR|config.json) [--seq-len N ...]`: GPU memory of a
run, from config.json alone."""

from __future__ import annotations

import argparse
import os

from qlora_trainer.errors import ArgumentError, UserError
from qlora_trainer.names import ALL_LINEAR, DTYPE_BYTES, OPTIMIZERS

HELP = "GPU memory a run needs, from config.json alone"
DESCRIPTION = ("Estimate the peak GPU memory of a QLoRA training run from the model's config.json alone (no weights "
               "are read, torch is not needed): the NF4 base, the fp32 LoRA weights, gradients and optimizer state, "
               "the activations with gradient checkpointing and the chunked loss, and the CUDA overhead; then the "
               "longest sequence and the largest batch that fit in --gpu-gib. Give the model and the run as flags, "
               "or give a training CONFIG.yaml: the model, seq len, batch, rank, targets, optimizer, compute dtype, "
               "LoRA dropout and loss chunk size are read from it, and flags given as well override it.")
FLAGS = {"compute_dtype": "--dtype"}  # RunSettings fields whose flag is not spelled like the field
# RunSettings field -> its flag's attribute in the Namespace
ARGS = {"seq_len": "seq_len", "batch_size": "batch_size", "rank": "rank", "targets": "targets",
        "optimizer": "optimizer", "loss_chunk_size": "loss_chunk_size", "compute_dtype": "dtype",
        "lora_dropout": "lora_dropout"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qlora_trainer.estimate import RunSettings  # plain Python, no torch: cheap to import

    d = RunSettings()
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG.yaml",
                   help="a training config (see configs/): model.path, data.max_seq_len, train.batch_size, lora.r, "
                        "lora.targets, train.optimizer, model.compute_dtype (auto: bf16), lora.dropout and "
                        "train.loss_chunk_size are read from it; the flags below override them")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of CONFIG's keys, as `train` takes them, e.g. lora.r=32")
    p.add_argument("--model", default=None,
                   help="model folder, its config.json, or a hub id in the local cache (default: model.path of "
                        "CONFIG; one of the two is needed)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence (default: data.max_seq_len of CONFIG, else {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per micro-batch (default: train.batch_size of CONFIG, else {d.batch_size})")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA r (default: lora.r of CONFIG, else {d.rank})")
    p.add_argument("--targets", default=None,
                   help=f"modules LoRA wraps: {ALL_LINEAR} or comma-separated names, e.g. q_proj,v_proj (default: "
                        f"lora.targets of CONFIG, else {ALL_LINEAR})")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help=f"optimizer whose state is counted (default: train.optimizer of CONFIG, else {d.optimizer})")
    p.add_argument("--loss-chunk-size", type=int, default=None,
                   help=f"tokens per chunk of the chunked cross-entropy (default: train.loss_chunk_size of CONFIG, "
                        f"else {d.loss_chunk_size})")
    p.add_argument("--dtype", default=None, choices=list(DTYPE_BYTES),
                   help=f"compute dtype of activations and unquantized weights (default: model.compute_dtype of "
                        f"CONFIG, auto meaning bf16, else {d.compute_dtype})")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help=f"LoRA dropout; above 0 each LoRA layer keeps a dropped copy of its input (default: "
                        f"lora.dropout of CONFIG, else {d.lora_dropout})")
    p.add_argument("--gpu-gib", type=float, default=80.0,
                   help="GPU memory in GiB to fit (default 80; an 'H100 80GB' has about 79.1 GiB)")


def run(args: argparse.Namespace) -> int:
    from qlora_trainer.estimate import (CONFIG_KEYS, RunSettings, estimate_memory, format_table, max_batch_that_fits,
                                        max_seq_len_that_fits, read_config_json, settings_from_config,
                                        shape_from_config)

    if args.gpu_gib <= 0:
        raise UserError(f"--gpu-gib must be positive, got {args.gpu_gib}")
    config_file, overrides = args.config, list(args.overrides)
    if config_file is not None and "=" in config_file and not os.path.isfile(config_file):
        config_file, overrides = None, [config_file, *overrides]  # `--model DIR key=value`: no CONFIG given
    from_config: dict = {}
    model = args.model
    if config_file is not None:
        from qlora_trainer.config import load_config

        cfg = load_config(config_file, overrides)
        from_config = settings_from_config(cfg)
        if model is None:
            model = cfg.model.path
        if not cfg.train.gradient_checkpointing:
            print(f"note: {config_file} sets train.gradient_checkpointing false; this estimate assumes it on, so "
                  "the activations of a real run are larger")
    elif overrides:
        raise UserError(f"overrides ({' '.join(overrides)}) need a CONFIG.yaml before them")
    if model is None:
        raise UserError("estimate needs a model: --model DIR (or config.json), or a training CONFIG.yaml")
    flags = {field: getattr(args, attr) for field, attr in ARGS.items() if getattr(args, attr) is not None}
    settings = {**from_config, **flags}
    try:
        config, path = read_config_json(model)
    except ArgumentError as err:
        if args.model is not None:
            raise
        raise UserError(f"{config_file}: model.path {err.template.format(arg='').strip()} (or give --model)") from None
    shape = shape_from_config(config, str(path))
    try:
        run = RunSettings(**settings)
    except ArgumentError as err:
        if err.argument in flags:
            raise
        raise UserError(f"{config_file}: {err.template.format(arg=CONFIG_KEYS[err.argument])}") from None
    print(format_table(estimate_memory(shape, run), shape, run))
    seq = max_seq_len_that_fits(args.gpu_gib, shape, run)
    batch = max_batch_that_fits(args.gpu_gib, shape, run)
    note = (f" (beyond the model's max_position_embeddings, {shape.max_positions:,})"
            if isinstance(shape.max_positions, int) and seq > shape.max_positions else "")
    print(f"fits in {args.gpu_gib:g} GiB: seq len up to {seq:,} at batch {run.batch_size}{note}; "
          f"batch up to {batch:,} at seq len {run.seq_len:,}")
    return 0
