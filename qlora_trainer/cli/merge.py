"""`qlora-trainer merge --base DIR --adapter DIR --out DIR`: a standard transformers folder of base + adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_trainer.names import DTYPE_NAMES, MERGE_INTO

HELP = "fold an adapter into its base and write a standard model folder"
DESCRIPTION = ("Stream the base checkpoint shard by shard, add scale * B @ A to each LoRA target, and write a folder "
               "plain transformers loads. With --verify, exit code 1 when the merged model fails the check.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the full-precision base model folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="output dtype (default: the checkpoint's own dtype)")
    p.add_argument("--into", choices=MERGE_INTO, default="dequantized",
                   help="dequantized: add to the NF4-rounded weights training saw (default); "
                        "original: add to the unquantized weights")
    p.add_argument("--compute-dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype weights were cast to before NF4 in training (default: recorded with the adapter or its "
                        "run, else the base's config.json dtype (said in one line), else bf16; CPU training uses "
                        "fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    p.add_argument("--verify", action="store_true",
                   help="compare the logits of quantized base + adapter and of the merged model (both computed in "
                        "fp32) on a few prompts, then print PASS or FAIL. A dequantized merge passes when, for the "
                        "least precise of --dtype and --compute-dtype, top-1 agreement >= 99%% and max |logit diff| "
                        "< 0.001 (fp32), >= 98%% and < 0.1 (fp16), >= 95%% and < 0.5 (bf16): what rounding the "
                        "merged weights allows. FAIL exits with code 1 and keeps the folder. --into original gets no "
                        "pass/fail: it is meant to differ from the quantized model by the NF4 rounding")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from qlora_trainer import progress
    from qlora_trainer.adapter import read_adapter
    from qlora_trainer.base_model import resolve_base
    from qlora_trainer.merge import adapter_compute_dtype, merge
    from qlora_trainer.verify import verify, verify_verdict

    base = resolve_base(args.base)
    out = merge(base, args.adapter, args.out, dtype=args.dtype, into=args.into, compute_dtype=args.compute_dtype,
                max_shard_size=args.max_shard_size, progress=not args.quiet and progress.bars())
    compute = args.compute_dtype
    if compute is None:  # what merge used (after its checks of the folders): said when nothing recorded it
        resolved = adapter_compute_dtype(read_adapter(args.adapter), Path(args.adapter), base)
        compute = resolved.name
        if resolved.assumed:
            print(resolved.assumed_line)
    print(f"merged ({args.into}) into {out}")
    if args.verify:
        report = verify(base, args.adapter, out)
        print(f"verify: {report['positions']} positions, max |logit diff| {report['max_abs_diff']:.3g}, "
              f"mean {report['mean_abs_diff']:.3g}, top-1 agreement {100 * report['top1_agreement']:.1f}%")
        verdict = verify_verdict(report, into=args.into, compute_dtype=compute)
        print(verdict.line)
        if verdict.passed is False:
            return 1  # not bad input (2): the merge ran, and its result does not match
    return 0
