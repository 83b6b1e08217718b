"""`qlora-trainer data CONFIG.yaml [key=value ...]`: how the dataset is rendered, masked and how long it is."""

from __future__ import annotations

import argparse

from qlora_trainer.cli.options import add_config_arguments

HELP = "show how CONFIG's dataset is rendered, masked and how long it is"
INTERMIXED = True  # flags and key=value overrides in any order


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "data.max_seq_len=512")


def run(args: argparse.Namespace) -> int:
    import time

    from qlora_trainer.config import load_config
    from qlora_trainer.data import load_tokenizer, preview
    from qlora_trainer.progress import bars

    start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    # The same cache entry `train` reads: a second `data`, or the `train` after it, tokenizes nothing.
    print(preview(cfg.data, tokenizer, cfg.train.seed, num_labels=cfg.model.num_labels, progress=bars(),
                  timing_from=start))
    return 0
