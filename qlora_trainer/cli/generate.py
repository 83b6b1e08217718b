"""`qlora-trainer generate --base DIR [--adapter DIR] (--prompt TEXT | --chat | --prompts FILE.jsonl)`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from qlora_trainer.cli.options import add_compute_options
from qlora_trainer.errors import UserError

HELP = "generate text with an adapter on the quantized base"
DESCRIPTION = ("Load the base as NF4, apply the adapter, render the prompt with the tokenizer's chat template (when it "
               "has one) and stream the reply.")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model folder (or a hub id already in the local cache)")
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="adapter folder (default: the base alone); with --prompts, NAME=DIR, repeated, one per "
                        "adapter the rows name")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='one JSON object per line, {"prompt": ..., "adapter": NAME or null}; rows with different '
                        "adapters share a batch; prints each row with its completion as JSON lines")
    p.add_argument("--batch-size", type=int, default=16, help="rows per mixed batch with --prompts (default 16)")
    p.add_argument("--prompt", default=None, help="the user message (with --chat: a system message)")
    p.add_argument("--chat", action="store_true",
                   help="interactive: one user message per stdin line; an empty line or EOF ends it. Each reply sees "
                        "the whole conversation so far (every earlier message and reply, and the --prompt system "
                        "message), so earlier turns steer later ones; see --no-history")
    p.add_argument("--no-history", action="store_true",
                   help="with --chat: answer each line on its own, as --prompt LINE would (the --prompt system "
                        "message is kept; earlier lines and replies are not sent)")
    p.add_argument("--no-chat-template", action="store_true", help="feed --prompt as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_compute_options(p)


def run(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        return _run_prompts(args)
    if args.adapter is not None and len(args.adapter) > 1:
        raise UserError("several --adapter NAME=DIR need --prompts FILE.jsonl, whose rows name their adapter")
    return _run_single(args, args.adapter[0] if args.adapter else None)


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_single(args: argparse.Namespace, adapter: str | None) -> int:
    from qlora_trainer.generate import generate, load_for_generation

    if args.prompt is None and not args.chat:
        raise UserError("give --prompt TEXT, or --chat for an interactive conversation")
    if args.no_history and not args.chat:
        raise UserError("--no-history goes with --chat (a single --prompt has no history)")
    model, tokenizer = load_for_generation(args.base, adapter, compute_dtype=args.dtype, device=args.device)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, stream=_print)
    if not args.chat:
        generate(model, tokenizer, args.prompt, chat=False if args.no_chat_template else None, **options)
        _print("\n")
        return 0
    system = [] if args.prompt is None else [{"role": "system", "content": args.prompt}]
    messages: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            _print("> ")
        line = sys.stdin.readline()
        if not line.strip():  # EOF or an empty line ends the conversation
            return 0
        user = {"role": "user", "content": line.rstrip("\n")}
        if args.no_history:  # each line alone, with the same seed: what `--prompt LINE` gives
            generate(model, tokenizer, system + [user], **options)
            _print("\n")
            continue
        messages.append(user)
        reply = generate(model, tokenizer, messages, **options)
        _print("\n")
        messages.append({"role": "assistant", "content": reply})
        options["seed"] = None if args.seed is None else args.seed + len(messages)  # fresh samples each turn


def _run_prompts(args: argparse.Namespace) -> int:
    """--prompts FILE.jsonl --adapter NAME=DIR ...: one JSON line per row, with the row's fields and its
    "completion", in the file's order."""
    from qlora_trainer.base_model import resolve_base
    from qlora_trainer.data import pad_token_id
    from qlora_trainer.generate import eos_ids, load_tokenizer_from, render_prompt, tokenizer_dir
    from qlora_trainer.loading import load_quantized
    from qlora_trainer.multi_adapter import generate_batch_ids, load_adapters_into

    if args.chat or args.prompt is not None:
        raise UserError("--prompts takes the prompts from the file: leave out --prompt and --chat")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"need --temperature >= 0 (got {args.temperature}) and 0 < --top-p <= 1 (got {args.top_p})")
    folders = parse_named_adapters(args.adapter or [])
    rows = read_prompt_rows(args.prompts, set(folders))
    base = resolve_base(args.base)
    model = load_quantized(base, compute_dtype=args.dtype, device=args.device, progress=False)
    routing = load_adapters_into(model, folders)
    # An adapter saved with its own tokenizer (a chat template added in training) renders its rows.
    dirs = {name: tokenizer_dir(base, folder) for name, folder in [(None, None), *folders.items()]}
    loaded = {folder: load_tokenizer_from(folder) for folder in set(dirs.values())}
    tokenizers = {name: loaded[folder] for name, folder in dirs.items()}
    chat = False if args.no_chat_template else None
    eos = eos_ids(model, tokenizers[None])
    pad = pad_token_id(tokenizers[None])
    device = next(model.parameters()).device
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start:start + args.batch_size]
        names = [row.get("adapter") for row in batch]
        prompts = [render_prompt(tokenizers[n], row["messages"] if "messages" in row else row["prompt"], chat=chat)
                   for n, row in zip(names, batch)]
        routing.set_rows(names, device)
        new = generate_batch_ids(model, prompts, max_new_tokens=args.max_new_tokens, eos=eos, pad_id=pad,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        for n, row, ids in zip(names, batch, new):
            sys.stdout.write(json.dumps({**row, "completion": tokenizers[n].decode(ids, skip_special_tokens=True)},
                                        ensure_ascii=False) + "\n")
        sys.stdout.flush()
    routing.clear()
    return 0


def parse_named_adapters(values: list[str]) -> dict[str, str]:
    """["a=runs/a/adapter", ...] -> {"a": "runs/a/adapter", ...}."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not _NAME.fullmatch(name) or not folder:
            raise UserError(f"--adapter {value}: with --prompts, name each adapter: --adapter NAME=DIR "
                            "(NAME: letters, digits, _ . -), and give the name in the rows' \"adapter\" field")
        if name in named:
            raise UserError(f"--adapter {value}: the name {name!r} is given twice")
        named[name] = folder
    return named


def read_prompt_rows(path: str | os.PathLike, names: set[str]) -> list[dict]:
    """Rows of a JSONL file: {"prompt": str or "messages": [...], "adapter": NAME or null/absent}."""
    from qlora_trainer.jsonl import read_objects

    rows = []
    for number, row in read_objects(path, '{"prompt": ..., "adapter": NAME or null} rows (for --prompts)'):
        if not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise UserError(f'{path}:{number}: expected an object with "prompt" (a string) or "messages" (a list)')
        adapter = row.get("adapter")
        if adapter is not None and adapter not in names:
            known = ", ".join(sorted(names)) or "none given"
            raise UserError(f"{path}:{number}: adapter {adapter!r} is not one of the --adapter NAME=DIR given "
                            f"({known}); use null for the base alone")
        rows.append(row)
    return rows
