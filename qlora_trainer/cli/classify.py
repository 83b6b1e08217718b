"""`qlora-trainer classify --base DIR --adapter DIR (--text ... | --file rows.jsonl)`: label texts."""

from __future__ import annotations

import argparse

from qlora_trainer.cli.options import add_compute_options
from qlora_trainer.errors import UserError

HELP = "label texts with a classification adapter on the quantized base"
DESCRIPTION = ("Load the base as an NF4 sequence classifier, apply the adapter (LoRA and its head), feed each text as "
               "tokenizer(text) and print its label and probability; with labelled rows, the accuracy.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model folder (or a hub id already in the local cache)")
    p.add_argument("--adapter", required=True, help="classification (SEQ_CLS) adapter folder")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeat for several)")
    p.add_argument("--file", default=None, metavar="ROWS.jsonl",
                   help='one {"text": ..., "label": name or id (optional)} object per line')
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    add_compute_options(p)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from qlora_trainer import progress, tasks
    from qlora_trainer.base_model import resolve_base
    from qlora_trainer.classify import predict, read_rows
    from qlora_trainer.tasks.classification import label_names_of

    if (args.text is None) == (args.file is None):
        raise UserError("classify: pass exactly one of --text \"...\" or --file rows.jsonl")
    base = resolve_base(args.base)
    model, _ = tasks.get("classification").load_with_adapter(base, args.adapter, compute_dtype=args.dtype,
                                                             device=args.device, progress=progress.bars())
    names = label_names_of(model)
    if args.file is not None:
        texts, gold = read_rows(args.file, names)
    else:
        texts, gold = list(args.text), [None] * len(args.text)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{base.path}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    probs = predict(model, tokenizer, texts, batch_size=args.batch_size)
    hits = 0
    for text, p, g in zip(texts, probs, gold):
        k = int(p.argmax())
        mark = "" if g is None else ("  ok" if k == g else f"  WRONG (label {names[g]})")
        hits += g is not None and k == g
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"{names[k]}\t{float(p[k]):.4f}\t{shown}{mark}")
    labelled = sum(g is not None for g in gold)
    if labelled:
        print(f"accuracy: {hits}/{labelled} = {100 * hits / labelled:.1f}%")
    return 0
