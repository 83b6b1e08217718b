"""How close N processes come to one: the same config trained by 1 process, by N under DDP and by N under FSDP.

    python scripts/distributed_parity.py [--processes 2] [--config configs/tiny.yaml] [key=value ...]

Prints, for DDP and FSDP against the one-process run: the largest difference of a step's loss (metrics.jsonl, 6
decimals) and of an adapter weight, and each rank's share of the packed NF4 bytes under FSDP. Defaults: the tiny
LLaMA on the demo data, 8 steps of 8 examples, no LoRA dropout (its masks are drawn per rank). On CPU the processes
talk over gloo, one thread each."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["train.max_steps=8", "train.batch_size=8", "train.grad_accum=1", "train.save_every=4",
            "train.eval_every=4", "train.log_every=1", "lora.dropout=0"]


def train(config: str, out: Path, overrides: list[str], kind: str | None, n: int) -> str:
    launcher = [] if kind is None else ["-m", "accelerate.commands.launch", "--config_file",
                                        str(REPO / "configs" / "accelerate" / f"{kind}.yaml"), "--num_processes",
                                        str(n)]
    command = [sys.executable, *launcher, "-m", "qlora_trainer", "train", config, f"out={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "QLORA_PROGRESS": "0"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_diff(a: Path, b: Path) -> float:
    x, y = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (a, b))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = DEFAULTS + args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train(args.config, root / "one", overrides, None, 1)
        one = losses(root / "one")
        for kind in ("ddp", "fsdp"):
            log = train(args.config, root / kind, overrides, kind, args.processes)
            theirs = losses(root / kind)
            loss_diff = max(abs(a - b) for a, b in zip(one, theirs))
            print(f"{kind} x{args.processes} vs 1 process: {len(theirs)} steps, max |loss diff| {loss_diff:.1e}, "
                  f"max |adapter diff| {adapter_diff(root / 'one', root / kind):.1e}")
            shares = re.search(r"FSDP: .*", log)
            if shares:
                print(f"  {shares.group(0)}")


if __name__ == "__main__":
    main()
