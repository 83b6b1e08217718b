"""`qlora-trainer eval --base DIR [--adapter DIR] --data FILE`: loss and perplexity (a classifier: loss, accuracy,
macro-F1) on every row of a dataset, rendered and masked as training does."""

from __future__ import annotations

import argparse

from qlora_trainer.cli.options import add_compute_options
from qlora_trainer.errors import UserError
from qlora_trainer.names import DATA_FORMATS

HELP = "loss and perplexity (a classifier: accuracy, macro-F1) of base + adapter on a dataset"
DESCRIPTION = ("Render and mask every row of --data as training does (the format's template, only the response / "
               "assistant tokens and the final EOS scored unless --train-on-prompt, cut at --max-seq-len), then "
               "print the mean loss per scored token and the perplexity exp(loss); for a classification adapter, the "
               "mean loss per row, the accuracy and the macro-F1. When the adapter sits in a run folder "
               "(OUT/adapter), the run's config.yaml supplies --format, --max-seq-len and --train-on-prompt unless "
               "they are given, so the loss is the eval_loss that run would log for these rows.")
FLAGS = {"data_path": "--data", "data_format": "--format"}  # library arguments whose flag is spelled otherwise


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model folder (or a hub id already in the local cache)")
    p.add_argument("--adapter", default=None,
                   help="adapter folder (default: the base alone, as a causal LM); its task (causal LM or "
                        "classifier) decides the metrics")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="the rows to evaluate, all of them: a jsonl/json/csv/parquet file or a save_to_disk folder")
    p.add_argument("--format", default=None, choices=DATA_FORMATS,
                   help="how the rows are written, as data.format (default: the run's config.yaml beside the "
                        "adapter; classification for a classifier; else needed)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens kept per row, as data.max_seq_len (default: the run's config.yaml, else 2048)")
    p.add_argument("--train-on-prompt", default=None, action=argparse.BooleanOptionalAction,
                   help="score the prompt tokens too, as data.train_on_prompt (default: the run's config.yaml, "
                        "else no)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    add_compute_options(p)


def run(args: argparse.Namespace) -> int:
    from qlora_trainer.base_model import resolve_base
    from qlora_trainer.paths import run_config_file
    from qlora_trainer.evaluation import data_config, evaluate_dataset

    if args.data is None:
        raise UserError("eval needs --data FILE: the rows to evaluate (jsonl/json/csv/parquet)")
    base = resolve_base(args.base)
    data_cfg = data_config(args.data, adapter=args.adapter, data_format=args.format, max_seq_len=args.max_seq_len,
                           train_on_prompt=args.train_on_prompt)
    from_run = None in (args.format, args.max_seq_len, args.train_on_prompt) and args.adapter is not None
    source = run_config_file(args.adapter) if from_run else None
    result = evaluate_dataset(base, args.adapter, data_cfg, batch_size=args.batch_size, compute_dtype=args.dtype,
                              device=args.device)
    settings = f"format {data_cfg.format}, max_seq_len {data_cfg.max_seq_len}"
    if data_cfg.train_on_prompt:
        settings += ", train_on_prompt"
    if source is not None:
        settings += f", from {source}"
    skipped = [f"{n} {what}" for n, what in [(result["dropped"], "dropped (nothing to score)"),
                                              (result["truncated"], "truncated")] if n]
    print(f"eval: {data_cfg.path} ({settings}): {result['examples']} rows"
          + (f", {result['tokens']} scored tokens" if "tokens" in result else "")
          + (f"; {', '.join(skipped)}" if skipped else ""))
    if "accuracy" in result:
        print(f"loss {result['loss']:.4f} per row, macro-F1 {result['macro_f1']:.3f}")
        print(f"accuracy: {result['correct']}/{result['examples']} = {100 * result['accuracy']:.1f}%")
    else:
        print(f"loss {result['loss']:.4f} per scored token, perplexity {result['perplexity']:.3f}")
    return 0
