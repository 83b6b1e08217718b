"""The data pipeline at scale: the list pipeline of main before issue 16 ("old") against the Arrow pipeline
("new"), on synthetic alpaca and chat sets, each measurement in a fresh subprocess.

    python scripts/bench_data.py                          # alpaca and chat, 100k rows; old and new
    python scripts/bench_data.py --rows 100000 1000000 --formats alpaca --old-max-rows 100000
    python scripts/bench_data.py --quick                  # 2k rows, a smoke run

For each (format, rows, pipeline) it reports:
  cold   seconds from the start of the data phase (tokenizer loaded) to the first step's micro-batches collated,
         with no token cache (new: an empty data.cache_dir);
  warm   the same again with the cache the cold run wrote (old: it has none, so its warm run is another cold
         run, measured only with --old-warm);
  CPU    user + system seconds of the cold run and its workers: what the cold time would be on one idle core,
         the figure that does not depend on the load of a shared machine;
  rows/s rows / cold;
  peak   the largest peak RSS of the data phase: the process, or its largest tokenizing worker, whichever is
         higher (ru_maxrss of RUSAGE_SELF and RUSAGE_CHILDREN), with the RSS after imports beside it.
The old pipeline is main's data.py at the commit this branch started from (`git show REF:qlora_trainer/data.py`
into a temporary module), run by the same harness. Rows are short (about 200 bytes), as in issue 16; the
tokenizer is assets/tiny-llama's. Data and caches go under --work (default /tmp/qlora-bench-data).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "assets" / "tiny-llama"
OLD_REF = "71edbabc6d2be2fdce37f3538ed3e8804c8b475e"  # main when issue 16 started: the list pipeline
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired cats watch from an old wooden fence "
         "near the river bank").split()


def _phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def make_rows(fmt: str, rows: int, path: Path) -> None:
    """Short rows, each a little different (about 200 bytes of JSON)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if fmt == "alpaca":
                row = {"instruction": f"Row {i}: {_phrase(i, 8)}?", "input": _phrase(i + 1, 4) if i % 2 else "",
                       "output": f"{_phrase(i + 2, 12)}."}
            else:
                row = {"messages": [{"role": "user", "content": f"Row {i}: {_phrase(i, 8)}?"},
                                    {"role": "assistant", "content": f"{_phrase(i + 2, 14)}."}]}
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------ the child

def child(args) -> None:
    """One measurement: the data phase of `train` up to the first step's batches, as JSON on stdout."""
    sys.path.insert(0, str(ROOT))
    from qlora_trainer.config import DataConfig
    from qlora_trainer.training import batch_indices

    if args.pipeline == "old":
        sys.path.insert(0, args.old_dir)
        import old_data as data  # noqa: F401
    else:
        from qlora_trainer import data
    tokenizer = data.load_tokenizer(str(TOKENIZER))
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = DataConfig(path=args.data, format=args.format, max_seq_len=args.max_seq_len, packing=args.packing,
                     **({"cache_dir": args.cache} if args.pipeline == "new" else {}))
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    train, _, stats = data.build_datasets(cfg, tokenizer, 0)
    micro = [data.collate([train[i] for i in idx], 0) for idx in batch_indices(0, len(train), 4, 4, 0)]
    seconds = time.perf_counter() - start
    assert len(micro) == 4
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"seconds": seconds, "cpu_s": _cpu_seconds() - cpu_start, "peak_mb": peak / 1024,
                      "imports_mb": rss_imports,
                      "examples": len(train), "reused": getattr(stats, "cache_reused", False)}))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the tokenizing workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(pipeline: str, fmt: str, data: Path, cache: Path, old_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--pipeline", pipeline, "--format", fmt, "--data", str(data),
           "--cache", str(cache), "--old-dir", str(old_dir), "--max-seq-len", str(args.max_seq_len)]
    if args.packing:
        cmd.append("--packing")
    env = {**os.environ, "QLORA_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{pipeline} {fmt} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000])
    p.add_argument("--formats", nargs="+", default=["alpaca", "chat"], choices=["alpaca", "chat"])
    p.add_argument("--pipelines", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--old-max-rows", type=int, default=100_000, help="run the old pipeline up to this many rows")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--old-warm", action="store_true", help="measure the old pipeline's second run too")
    p.add_argument("--work", default="/tmp/qlora-bench-data")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--old-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.rows = [2000]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old_dir = work / "old"
    old_dir.mkdir(exist_ok=True)
    (old_dir / "old_data.py").write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_REF}:qlora_trainer/data.py"],
                                                        capture_output=True, text=True, check=True).stdout)
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    results = []
    for fmt in args.formats:
        for rows in args.rows:
            data = work / f"{fmt}-{rows}.jsonl"
            if not data.exists():
                make_rows(fmt, rows, data)
            for pipeline in args.pipelines:
                if pipeline == "old" and rows > args.old_max_rows:
                    continue
                cache = work / f"cache-{fmt}-{rows}"
                shutil.rmtree(cache, ignore_errors=True)
                load = os.getloadavg()[0]
                cold = measure(pipeline, fmt, data, cache, old_dir, args)
                warm = cold if pipeline == "old" and not args.old_warm else measure(pipeline, fmt, data, cache,
                                                                                     old_dir, args)
                assert pipeline == "old" or (warm["reused"] and not cold["reused"])
                result = {"format": fmt, "rows": rows, "pipeline": pipeline, "cold_s": cold["seconds"],
                          "cold_cpu_s": cold["cpu_s"],
                          "warm_s": warm["seconds"], "rows_per_s": rows / cold["seconds"],
                          "peak_mb": max(cold["peak_mb"], warm["peak_mb"]), "warm_peak_mb": warm["peak_mb"],
                          "imports_mb": cold["imports_mb"], "load": load}
                results.append(result)
                print(json.dumps(result), flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}\n")
    print("| format | rows | pipeline | cold to first step | CPU time (cold) | warm to first step | rows/s (cold) | "
          "peak RSS | after imports | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['format']} | {r['rows']:,} | {r['pipeline']} | {r['cold_s']:.1f} s | {r['cold_cpu_s']:.0f} s | "
              f"{r['warm_s']:.1f} s | {r['rows_per_s']:,.0f} | {r['peak_mb']:,.0f} MB | {r['imports_mb']:,.0f} MB | "
              f"{r['load']:.1f} |")


if __name__ == "__main__":
    main()
