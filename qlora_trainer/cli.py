"""Command line: one subcommand per job. A UserError becomes one clear line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from qlora_trainer.errors import UserError


def _cmd_summary(args: argparse.Namespace) -> int:
    from qlora_trainer.loading import load_quantized, model_summary

    model = load_quantized(args.model, compute_dtype=args.dtype, device=args.device)
    print(model_summary(model))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from qlora_trainer.train import run_train_command

    return run_train_command(args.config, args.overrides, resume=args.resume, dry_run=args.dry_run)


def _cmd_data(args: argparse.Namespace) -> int:
    from qlora_trainer.data import run_data_command

    return run_data_command(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-trainer", description="QLoRA fine-tuning on one GPU.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune: CONFIG.yaml [key=value ...] -> OUT/adapter, checkpoints, metrics")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=32 train.lr=1e-4 out=runs/x")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in out")
    p.add_argument("--dry-run", action="store_true", help="only render a few examples and the token statistics")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="show how CONFIG's dataset is rendered, masked and how long it is")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_seq_len=512")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("summary", help="load a model folder as NF4 and print its layers and memory")
    p.add_argument("model", help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.set_defaults(func=_cmd_summary)

    from qlora_trainer.estimate import add_estimate_parser

    add_estimate_parser(sub)
    from qlora_trainer.merge import add_merge_parser
    from qlora_trainer.generate import add_generate_parser

    add_merge_parser(sub)
    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
