"""`inspect`: what did the adapter learn? A table of every LoRA update's spectrum, a plot, the norms of the updates
against the base weights, and rank-K truncation written as a new adapter. The maths is in spectrum.py.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch

from qlora_trainer import atomic, quant, tasks
from qlora_trainer.adapter import Adapter, replaceable, validate
from qlora_trainer.errors import ArgumentError
from qlora_trainer.loading import load_quantized
from qlora_trainer.names import PEFT_TASK_TYPES, CAUSAL_LM
from qlora_trainer.peft_layout import adapter_record, peft_config, write_adapter_files
from qlora_trainer.spectrum import (VERDICT_ENERGY, VERDICT_SHARE, ModuleSpectrum, table_key, truncate,
                                   truncate_experts, verdict, verdict_rank)


# ------------------------------------------------------------------------------------------ report

def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def table(found: list[ModuleSpectrum], top: int = 4) -> str:
    """Rows grouped by module type, then layer; each group ends with its mean/median row. An expert weight has one row
    per expert (gate_up_proj[0], gate_up_proj[1], ... of each layer, together): each expert's update is its own
    matrix, with its own rank and size, and the experts of one layer side by side show which ones the adapter used."""
    with_base = any(s.base_norm is not None for s in found)
    width = max([10] + [len(s.label) for s in found])
    head = f"{'module':<{width}} {'layer':>5} {'r90':>4} {'r99':>4} {'s1/sr':>8} {'|dW|_F':>9}"
    head += f" {'|dW|/|W|':>9}" if with_base else ""
    head += "  top singular values"
    lines = [head, "-" * len(head)]
    kinds = list(dict.fromkeys(s.kind for s in found))
    for kind in kinds:
        group = [s for s in found if s.kind == kind]
        for s in group:
            row = (f"{s.label:<{width}} {'-' if s.layer is None else s.layer:>5} {s.rank90:>4} {s.rank99:>4} "
                   f"{_fmt(s.condition, '8.1f'):>8} {s.norm:>9.3g}")
            row += f" {_fmt(s.relative, '9.2%'):>9}" if with_base else ""
            row += "  " + " ".join(f"{float(v):.3g}" for v in s.sigma[:top])
            lines.append(row)
        if len(group) > 1:
            mean = lambda values: sum(values) / len(values)  # noqa: E731
            conds = sorted(s.condition for s in group)
            row = (f"{kind:<{width}} {'mean':>5} {mean([s.rank90 for s in group]):>4.1f} "
                   f"{mean([s.rank99 for s in group]):>4.1f} {_fmt(conds[len(conds) // 2], '8.1f'):>8} "
                   f"{mean([s.norm for s in group]):>9.3g}")
            if with_base:
                rel = [s.relative for s in group if s.relative is not None]
                row += f" {_fmt(mean(rel) if rel else None, '9.2%'):>9}"
            lines.append(row)
    return "\n".join(lines)


def plot(found: list[ModuleSpectrum], path: str | os.PathLike) -> Path:
    """PNG: layers x module types coloured by the rank that holds 90% of the energy, and the mean normalized
    spectrum (sigma_i / sigma_1) per module type. The figure's title is the verdict line (spectrum.verdict: the same
    90% rank, taken over 95% of the modules), and the colour bar marks the verdict's rank. Written to a temporary
    name, then renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.MaxNLocator below)

    kinds = list(dict.fromkeys(s.kind for s in found))
    layers = sorted({s.layer for s in found if s.layer is not None}) or [None]
    cells: dict[tuple[int, int], list[int]] = {}  # an expert weight: one 90% rank per expert, shown as their mean
    for s in found:
        if s.layer in layers:
            cells.setdefault((layers.index(s.layer), kinds.index(s.kind)), []).append(s.rank90)
    grid = torch.full((len(layers), len(kinds)), float("nan"))
    for (i, j), ranks in cells.items():
        grid[i, j] = sum(ranks) / len(ranks)
    r = max(s.r for s in found)

    fig, (ax_map, ax_spec) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.25 * len(layers) + 1.5)),
                                          gridspec_kw={"width_ratios": [max(len(kinds), 3), 4]})
    image = ax_map.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=r, interpolation="nearest")
    ax_map.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax_map.set_yticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers])
    if len(layers) > 32:
        ax_map.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(16, integer=True))
    if len(layers) * len(kinds) <= 400:  # small enough to read: write each rank in its cell
        for (i, j), value in zip(torch.cartesian_prod(torch.arange(len(layers)), torch.arange(len(kinds))).tolist(),
                                 grid.flatten().tolist()):
            if not math.isnan(value):
                ax_map.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if value < 0.6 * r else "black")
    ax_map.set_ylabel("layer")
    ax_map.set_title(f"per module: rank holding {VERDICT_ENERGY:.0%} of the energy (of r={r})", fontsize="medium")
    bar = fig.colorbar(image, ax=ax_map)
    k, _ = verdict_rank(found)
    if k:
        bar.ax.axhline(k, color="red", linewidth=2)
        bar.set_label(f"red line: rank {k}, enough for {VERDICT_SHARE:.0%} of modules")
    fig.suptitle(verdict(found), fontsize="medium")

    for kind in kinds:
        normalized = [_normalized(s.sigma, r) for s in found if s.kind == kind and float(s.sigma[0]) > 0]
        if normalized:
            ax_spec.plot(range(1, r + 1), torch.stack(normalized).mean(0).numpy(), marker=".", label=kind)
    ax_spec.set_yscale("log")
    ax_spec.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_spec.set_xlabel("index i")
    ax_spec.set_ylabel("mean sigma_i / sigma_1")
    ax_spec.set_title("mean normalized spectrum")
    ax_spec.legend(fontsize="small")
    ax_spec.grid(True, alpha=0.3)
    fig.tight_layout()

    try:
        return atomic.write_file(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _normalized(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """sigma / sigma_1, padded with a floor of 1e-12 to length r (log axis: zeros cannot be drawn)."""
    out = torch.full((r,), 1e-12, dtype=torch.float64)
    out[:len(sigma)] = (sigma / sigma[0]).clamp_min(1e-12)
    return out


# ------------------------------------------------------------------------------------------ base norms

def attach_base_norms(found: list[ModuleSpectrum], adapter: Adapter, base: str | os.PathLike, *,
                      device: str | None = None, progress: bool = False) -> None:
    """Set base_norm = ||W||_F of each module's dequantized NF4 base weight (the weight training saw)."""
    task = tasks.for_adapter(adapter)  # a classifier's head is checked against a classifier's
    model = load_quantized(base, compute_dtype=adapter.compute_dtype, device=device, progress=progress,
                           **task.model_kwargs(adapter=adapter))
    validate(model, adapter.path)
    for s in found:
        if s.expert is not None:  # an expert weight (a Parameter or an NF4 store): expert s.expert's matrix
            parent, _, attr = s.name.rpartition(".")
            weight = getattr(model.get_submodule(parent), attr)[s.expert]
        else:
            module = model.get_submodule(s.name)
            weight = quant.dequantize(module) if quant.is_nf4_linear(module) else module.weight
        s.base_norm = float(weight.detach().double().norm())


# ------------------------------------------------------------------------------------------ truncation

def write_truncated(adapter: Adapter, rank: int, out: str | os.PathLike) -> dict[str, float]:
    """Write the rank-`rank` truncation of `adapter` as an adapter folder in PEFT's layout, atomically: the config
    (target_modules, task, ...), the base fingerprint, the compute dtype, modules_to_save tensors and tokenizer
    files carry over; only r and the factors change. Returns each module's relative Frobenius error."""
    final = Path(out)
    source = Path(adapter.path) if adapter.path is not None else None
    if source is not None and final.resolve() == source.resolve():
        raise ArgumentError("out", f"{{arg}} {final}: is the adapter being truncated: choose another folder")
    if final.exists() and not replaceable(final):
        raise ArgumentError("out", f"{final}: exists and is not an adapter folder; refusing to replace it: "
                                   "choose another {arg} or remove it")
    weights, errors, _ = truncate(adapter, rank)
    experts, expert_errors = truncate_experts(adapter, rank)
    source_config = adapter.config
    defaults = peft_config(base_model_name_or_path=source_config.get("base_model_name_or_path") or "", r=rank,
                           alpha=adapter.alpha, dropout=float(source_config["lora_dropout"]),
                           use_rslora=adapter.use_rslora, task_type=PEFT_TASK_TYPES[CAUSAL_LM],
                           target_modules=source_config["target_modules"], fan_in_fan_out=False,
                           target_parameters=source_config.get("target_parameters"))
    config = {**defaults, **source_config, "r": rank}
    # A source from PEFT has no record of ours, so neither has its truncation.
    record = None if adapter.fingerprint is None else adapter_record(
        compute_dtype=adapter.compute_dtype, fingerprint=adapter.fingerprint, classifier=adapter.classifier)

    def write(folder: Path) -> None:
        write_adapter_files(folder, weights, config=config, extra=adapter.extra, record=record, experts=experts)
        for extra in source.iterdir() if source is not None else []:  # a tokenizer saved with the adapter
            if extra.is_file() and extra.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(extra, folder / extra.name)

    atomic.write_folder(final, write)
    return {**errors, **expert_errors}


def error_table(errors: dict[str, float]) -> str:
    found = sorted((_spectrum_of_key(name) for name in errors), key=table_key)
    width = max([10] + [len(s.label) for s in found])
    lines = [f"{'module':<{width}} {'layer':>5} {'rel. error':>10}"]
    for s in found:
        key = s.name if s.expert is None else f"{s.name}[{s.expert}]"
        lines.append(f"{s.label:<{width}} {'-' if s.layer is None else s.layer:>5} {errors[key]:>10.2%}")
    return "\n".join(lines)




def _spectrum_of_key(key: str) -> ModuleSpectrum:
    """A placeholder spectrum for a module path or an expert's "<path>[e]", for its place in the table."""
    match = re.fullmatch(r"(.+)\[(\d+)\]", key)
    if match:
        return ModuleSpectrum(match.group(1), torch.ones(1), 1, expert=int(match.group(2)))
    return ModuleSpectrum(key, torch.ones(1), 1)
