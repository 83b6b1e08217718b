"""The LoRA rank experiment: train one config at several ranks and print the table the LoRA literature shows.

    python scripts/rank_sweep.py configs/tiny-sentiment.yaml --ranks 1,2,4,8,16
    python scripts/rank_sweep.py configs/tiny-gpt2.yaml --ranks 1,2,4,8 train.max_steps=100

Each rank is a full `train` run of CONFIG (plus any key=value overrides) into OUT/r<rank>, with lora.r set to the
rank and lora.alpha scaled with it (alpha / r stays what CONFIG has, unless --alpha-ratio says otherwise). A
classifier also gets rank 0: its head alone, trained the same way with no LoRA at all.

Columns: rank; trainable parameters and their share of the model (counted as PEFT counts them); the eval metric
(accuracy and macro-F1 for a classifier, eval loss for a causal LM); wall time; and the energy rank `inspect`
finds: the mean over modules of the rank holding 90% of the update's energy (sum of squared singular values).
The table is also written as OUT/sweep.md and OUT/sweep.json, and the metric against the rank as OUT/sweep.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

from qlora_trainer.adapter import read_adapter  # noqa: E402
from qlora_trainer.config import load_config  # noqa: E402
from qlora_trainer.errors import UserError  # noqa: E402
from qlora_trainer.spectrum import spectra  # noqa: E402
from qlora_trainer.train import Run, train  # noqa: E402


def run_rank(cfg, rank: int, out: Path, log) -> dict:
    """Train cfg at `rank` into out; the row of the table."""
    start = time.perf_counter()
    result = train(cfg, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    adapter = read_adapter(result.adapter)
    found = spectra(adapter.weights, adapter.scale, adapter.r, adapter.experts)
    energy = sum(s.rank90 for s in found) / len(found)
    row = {"rank": rank, "trainable": result.trainable_params, "total": result.total_params,
           "seconds": round(seconds, 1), "energy_rank90": round(energy, 2), **result.eval_metrics}
    log(_format_row(row))
    return row


class HeadOnlyRun(Run):
    """Rank 0 of a classifier: the run's own data, step, schedule and data order, with no LoRA at all."""

    def _apply_lora(self) -> None:
        pass


def run_head_only(cfg, log) -> dict:
    """Train the new head alone (no checkpoints, no adapter: there is no LoRA to save) and evaluate it."""
    start = time.perf_counter()
    run = HeadOnlyRun(cfg, progress=False, log=lambda *_: None).setup()
    for step in range(run.max_steps):  # train.max_steps, or the steps train.epochs comes to
        run.step(step)
    row = {"rank": 0, "trainable": run.trainable_params, "total": run.total_params,
           "seconds": round(time.perf_counter() - start, 1), "energy_rank90": None, **run.evaluate()}
    log(_format_row(row))
    return row


def _format_row(row: dict) -> str:
    share = 100 * row["trainable"] / row["total"]
    if "eval_accuracy" in row:
        metric = f"{100 * row['eval_accuracy']:13.1f}% | {row['eval_f1']:8.3f}"
    else:
        metric = f"{row.get('eval_loss', float('nan')):9.4f}"
    energy = "-" if row["energy_rank90"] is None else f"{row['energy_rank90']:.2f}"
    return (f"| {row['rank']:>4} | {row['trainable']:>9,d} | {share:6.2f}% | {metric} | {row['seconds']:7.1f} | "
            f"{energy:>10} |")


def table(rows: list[dict], classifier: bool) -> str:
    metric, rule = ("eval accuracy | macro-F1", "--------------:|---------:") if classifier else \
        ("eval loss", "---------:")
    head = (f"| rank | trainable |   share | {metric} | time, s | energy r90 |\n"
            f"|-----:|----------:|--------:|{rule}|--------:|-----------:|")
    return "\n".join([head] + [_format_row(r) for r in rows])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifier = any("eval_accuracy" in r for r in rows)
    key, label = ("eval_accuracy", "eval accuracy") if classifier else ("eval_loss", "eval loss")
    lora = [r for r in rows if r["rank"] > 0 and key in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["rank"] for r in lora], [r[key] for r in lora], "o-", label="LoRA" + (" + head" if classifier else ""))
    for r in rows:
        if r["rank"] == 0 and key in r:
            ax.axhline(r[key], color="gray", linestyle="--", label="head only (rank 0)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["rank"] for r in lora], [str(r["rank"]) for r in lora])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a training config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.max_steps=100")
    parser.add_argument("--ranks", default="1,2,4,8,16", help="comma-separated LoRA ranks (default 1,2,4,8,16)")
    parser.add_argument("--alpha-ratio", type=float, default=None,
                        help="lora.alpha = ratio * r (default: CONFIG's alpha / r, so the scale stays the same)")
    parser.add_argument("--out", default=None, help="folder for the runs and the table (default: CONFIG's out + "
                                                    "'-sweep')")
    parser.add_argument("--no-head-only", action="store_true", help="classifier: skip the rank-0 (head only) run")
    args = parser.parse_intermixed_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
        if not ranks or min(ranks) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --ranks {args.ranks!r}: give positive integers, e.g. 1,2,4,8,16", file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, args.overrides)
        ratio = args.alpha_ratio if args.alpha_ratio is not None else base.lora.alpha / base.lora.r
        out = Path(args.out or f"{base.out}-sweep")
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        print(f"rank sweep of {args.config} ({base.model.task}, {base.model.path}) into {out}; alpha = {ratio:g} * r")
        print(table([], base.model.task == "classification"))
        if base.model.task == "classification" and not args.no_head_only:
            head_only = load_config(args.config, list(args.overrides) + [f"out={out / 'r0'}"])
            rows.append(run_head_only(head_only, print))
        for rank in ranks:
            cfg = load_config(args.config, list(args.overrides) + [f"lora.r={rank}", f"lora.alpha={ratio * rank}",
                                                                    f"out={out / f'r{rank}'}"])
            rows.append(run_rank(cfg, rank, out / f"r{rank}", print))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / "sweep.md").write_text(table(rows, base.model.task == "classification") + "\n", encoding="utf-8")
    plot(rows, out / "sweep.png", f"{Path(args.config).stem}: {base.model.path}")
    print(f"table: {out / 'sweep.md'}, plot: {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
