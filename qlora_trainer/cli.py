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
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.set_defaults(func=_cmd_summary)

    _add_merge_parser(sub)
    _add_generate_parser(sub)
    _add_inspect_parser(sub)
    _add_classify_parser(sub)

    from qlora_trainer.estimate import add_estimate_parser  # plain Python, no torch: cheap to import

    add_estimate_parser(sub)
    return parser


DTYPE_CHOICES = ["bf16", "fp16", "fp32"]


def _cmd_merge(args: argparse.Namespace) -> int:
    from qlora_trainer.merge import run_merge_command

    return run_merge_command(args)


def _add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base and write a standard model folder",
                       description="Stream the base checkpoint shard by shard, add scale * B @ A to each "
                                   "LoRA target, and write a folder plain transformers loads.")
    p.add_argument("--base", required=True, help="the full-precision base model folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="output dtype (default: the checkpoint's own dtype)")
    p.add_argument("--into", choices=["dequantized", "original"], default="dequantized",
                   help="dequantized: add to the NF4-rounded weights training saw (default); "
                        "original: add to the unquantized weights")
    p.add_argument("--compute-dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype weights were cast to before NF4 in training (default: recorded with the adapter, "
                        "else bf16; CPU training uses fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of quantized base + adapter and the merged model on a few prompts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        from qlora_trainer.multi_adapter import run_prompts_command

        return run_prompts_command(args)
    if args.adapter is not None and len(args.adapter) > 1:
        raise UserError("several --adapter NAME=DIR need --prompts FILE.jsonl, whose rows name their adapter")
    args.adapter = args.adapter[0] if args.adapter else None
    from qlora_trainer.generate import run_generate_command

    return run_generate_command(args)


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an adapter on the quantized base",
                       description="Load the base as NF4, apply the adapter, render the prompt with the "
                                   "tokenizer's chat template (when it has one) and stream the reply.")
    p.add_argument("--base", required=True, help="base model folder (or a hub id already in the local cache)")
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="adapter folder (default: the base alone); with --prompts, NAME=DIR, repeated, one per "
                        "adapter the rows name")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='one JSON object per line, {"prompt": ..., "adapter": NAME or null}; rows with different '
                        "adapters share a batch; prints each row with its completion as JSON lines")
    p.add_argument("--batch-size", type=int, default=16, help="rows per mixed batch with --prompts (default 16)")
    p.add_argument("--prompt", default=None, help="the user message (with --chat: a system message)")
    p.add_argument("--chat", action="store_true", help="interactive: one user message per stdin line; an empty "
                                                       "line or EOF ends it")
    p.add_argument("--no-chat-template", action="store_true", help="feed --prompt as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.set_defaults(func=_cmd_generate)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from qlora_trainer.spectrum import run_inspect_command

    return run_inspect_command(args)


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="what the adapter learned: the spectrum of every LoRA update; rank truncation",
                       description="Singular values of each module's update scale * B @ A (from QRs of B and A.T "
                                   "and an r x r SVD), the ranks holding 90%%/99%% of the energy, a verdict on "
                                   "the rank, and optionally a plot or a rank-K truncated adapter.")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="base model folder: adds ||dW||_F / ||W||_F against the "
                                                "dequantized base weight")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a PNG: layers x module types coloured "
                                                                   "by the 90%%-energy rank, and the mean spectrum")
    p.add_argument("--truncate-rank", type=int, default=None, metavar="K",
                   help="write the best rank-K approximation of every update (needs --out)")
    p.add_argument("--out", default=None, help="output adapter folder for --truncate-rank")
    p.add_argument("--device", default=None, help="device for loading --base: cuda, cpu (default: cuda if available)")
    p.set_defaults(func=_cmd_inspect)


def _cmd_classify(args: argparse.Namespace) -> int:
    from qlora_trainer.classify import run_classify_command

    return run_classify_command(args)


def _add_classify_parser(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a classification adapter on the quantized base",
                       description="Load the base as an NF4 sequence classifier, apply the adapter (LoRA and its "
                                   "head), feed each text as tokenizer(text) and print its label and probability; "
                                   "with labelled rows, the accuracy.")
    p.add_argument("--base", required=True, help="base model folder (or a hub id already in the local cache)")
    p.add_argument("--adapter", required=True, help="classification (SEQ_CLS) adapter folder")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeat for several)")
    p.add_argument("--file", default=None, metavar="ROWS.jsonl",
                   help='one {"text": ..., "label": name or id (optional)} object per line')
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.set_defaults(func=_cmd_classify)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        # One line, whatever a library put into the text we quote (transformers' messages span several).
        print("error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
