"""Flags several commands share."""

from __future__ import annotations

import argparse

from qlora_trainer.names import DTYPE_NAMES


def add_compute_options(p: argparse.ArgumentParser) -> None:
    """--dtype and --device of the commands that load a model."""
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


def add_config_arguments(p: argparse.ArgumentParser, example: str) -> None:
    """CONFIG.yaml and its dotted key=value overrides."""
    p.add_argument("config", help="YAML config (see configs/)")
    # default=[]: an empty list is not "missing" (parse_intermixed_args would call the positional required)
    p.add_argument("overrides", nargs="*", default=[], help=f"dotted overrides, e.g. {example}")
