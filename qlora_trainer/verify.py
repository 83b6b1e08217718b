"""`merge --verify`: does the merged folder compute what the quantized base + adapter computes? The logits of both
on a few prompts, and a PASS/FAIL against tolerances stated by the precision the merged weights went through."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qlora_trainer import tasks
from qlora_trainer.adapter import read_adapter
from qlora_trainer.base_model import BaseModel, checkpoint_files
from qlora_trainer.names import MERGE_INTO, dtype_name
from qlora_trainer.shards import header_entries


def verify(base: str | os.PathLike | BaseModel, adapter: str | os.PathLike, merged: str | os.PathLike, *,
           texts: list[str] | None = None, device: str | None = None) -> dict:
    """Logits of quantized base + adapter vs the merged folder (plain transformers, fp32) on a few prompts (a
    classifier: class logits of a few texts). Returns {max_abs_diff, mean_abs_diff, top1_agreement, positions,
    dtype}, dtype being the least precise dtype of the merged folder's floating tensors (what verify_verdict's
    tolerance depends on)."""
    task = tasks.for_adapter(read_adapter(adapter))
    report = task.verify_merged(base, adapter, merged, texts=texts, device=device)
    return {**report, "dtype": merged_weights_dtype(merged)}


# What `merge --verify` accepts from a dequantized merge, by the least precise dtype the merged weights went through
# (the output dtype, or the compute dtype the NF4 weights were rounded to before the update was added): (least top-1
# agreement, max |logit diff| below). Both sides are computed in fp32, so what is left is that rounding: none in
# fp32 (summation order only), 11 significant bits in fp16, 8 in bf16, which moves logits by a few hundredths and
# flips the top token where the two best are about that close. A broken merge (a missing, transposed or mis-scaled
# update) moves them by the size of the update's effect.
VERIFY_TOLERANCES = {"fp32": (0.99, 1e-3), "fp16": (0.98, 0.1), "bf16": (0.95, 0.5)}
_LOOSEST_FIRST = ("bf16", "fp16", "fp32")


def merged_weights_dtype(merged: str | os.PathLike) -> str:
    """The least precise of the dtypes of a model folder's floating tensors (bf16 < fp16 < fp32), from the
    safetensors headers."""
    found = {dtype_name(dtype) or "fp32" for _, dtype in header_entries(checkpoint_files(Path(merged))).values()
             if dtype.is_floating_point}
    return next((name for name in _LOOSEST_FIRST if name in found), "fp32")


@dataclass(frozen=True)
class Verdict:
    passed: bool | None  # None: no pass/fail for this kind of merge (into original)
    line: str


def verify_verdict(report: dict, *, into: str = "dequantized", compute_dtype: str = "fp32") -> Verdict:
    """PASS or FAIL for a verify() report of a merge made with `into` and `compute_dtype`: a dequantized merge passes
    when the top-1 agreement and the max |logit diff| are within VERIFY_TOLERANCES of the least precise of the merged
    weights' dtype (report["dtype"]) and the compute dtype. An original merge adds the update to the unquantized
    weights, so it is meant to differ from the quantized model it is compared with by the NF4 rounding: no pass/fail
    (passed is None), the numbers say how far apart the two are."""
    if into not in MERGE_INTO:
        raise ValueError(f"into must be one of {MERGE_INTO}, got {into!r}")
    agreement, diff = report["top1_agreement"], report["max_abs_diff"]
    if into == "original":
        return Verdict(None, "verify: no pass/fail for --into original: it adds the update to the unquantized "
                             f"weights, so it differs from the quantized base + adapter by the NF4 rounding by design "
                             f"(top-1 agreement {100 * agreement:.1f}%); --into dequantized is the merge verify checks")
    used = {report.get("dtype", "fp32"), compute_dtype}
    dtype = next((name for name in _LOOSEST_FIRST if name in used), "fp32")
    min_top1, max_diff = VERIFY_TOLERANCES[dtype]
    wanted = f"top-1 agreement >= {100 * min_top1:g}% and max |logit diff| < {max_diff:g} for {dtype} rounding"
    failed = []
    if not agreement >= min_top1:
        failed.append(f"top-1 agreement {100 * agreement:.1f}% is below {100 * min_top1:g}%")
    if not diff < max_diff:  # a NaN fails too
        failed.append(f"max |logit diff| {diff:.3g} is not below {max_diff:g}")
    if not failed:
        return Verdict(True, f"verify: PASS ({wanted})")
    return Verdict(False, f"verify: FAIL: {' and '.join(failed)} (wanted: {wanted}): the merged model does not compute "
                          "what the quantized base + adapter computes; the folder is left in place to inspect")
