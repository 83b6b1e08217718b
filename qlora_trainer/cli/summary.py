"""`qlora-trainer summary MODEL`: load a model folder as NF4 and print its layers and memory."""

from __future__ import annotations

import argparse

from qlora_trainer.cli.options import add_compute_options

HELP = "load a model folder as NF4 and print its layers and memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder (config.json + *.safetensors)")
    add_compute_options(p)


def run(args: argparse.Namespace) -> int:
    from qlora_trainer import progress
    from qlora_trainer.loading import load_quantized
    from qlora_trainer.model_summary import model_summary

    model = load_quantized(args.model, compute_dtype=args.dtype, device=args.device, progress=progress.bars())
    print(model_summary(model))
    return 0
