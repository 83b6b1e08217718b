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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-trainer", description="QLoRA fine-tuning on one GPU.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="load a model folder as NF4 and print its layers and memory")
    p.add_argument("model", help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.set_defaults(func=_cmd_summary)
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
