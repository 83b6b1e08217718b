"""Host memory by phase: `qlora-trainer train` beside its parts and beside transformers + PEFT, each in a fresh process.

    python scripts/bench_host_memory.py                       # hidden 1024, 16 layers, fp32 and bf16, 2 steps
    python scripts/bench_host_memory.py --dtypes fp32 --steps 1 --keep /tmp/hm   # reuse the checkpoints in /tmp/hm

For each checkpoint dtype (a random LLaMA written by scripts/make_random_checkpoint.py, 200-token text rows):

  train       `python -m qlora_trainer train` (batch 1, seq 200, r=16, all-linear, paged_adamw_8bit, gradient
              checkpointing: the defaults), its phases read back from OUT/host_memory.json;
  parts       ours piece by piece, as a script would do it: load_quantized + apply_lora ("model load"), then one
              forward and backward at 200 tokens ("first step"), with the allocator setting train uses;
  peft        transformers + PEFT: from_pretrained(BitsAndBytesConfig(nf4, double quant, fp32 compute)) +
              get_peft_model(LoraConfig(r=16, target_modules="all-linear")) with gradient checkpointing, then the
              same forward and backward and a torch AdamW step ("first step"), the steps after it ("steady state")
              and save_pretrained ("save"); glibc's allocator as it comes.

Each cell is the phase's peak resident memory (VmHWM, reset per phase; MiB) and, in brackets, how far it rose above
the phase's start. Below the table: train's peak above its imports against load + one step (the parts' two rises),
and against the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEQ_LEN = 200
PHASES = ["imports", "data", "model load", "first step", "steady state", "save"]
WORDS = ("the cat dog bird fish horse cow sheep tree house car boat book table chair door window river mountain city "
         "road garden apple bread milk water").split()


def write_rows(path: Path, rows: int = 200) -> Path:
    """Text rows long enough to fill max_seq_len=200 tokens each."""
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(300))}) + "\n"
                            for _ in range(rows)))
    return path


# ------------------------------------------------------------------------------------------------ children

def child_parts(model_dir: str, data: str) -> dict:
    """Ours piece by piece: load, then one forward and backward."""
    from qlora_trainer import libc
    from qlora_trainer.host_memory import HostMemory
    from qlora_trainer.loading import load_quantized
    from qlora_trainer.lora import apply_lora
    from qlora_trainer.loss import CausalLMLoss
    from qlora_trainer.train import MMAP_THRESHOLD
    from qlora_trainer.training import enable_checkpointing

    ids = _ids(model_dir, data)  # the tokenizer's imports belong to no measured phase
    memory = HostMemory()
    libc.set_mmap_threshold(MMAP_THRESHOLD)
    model = load_quantized(model_dir, compute_dtype="fp32", device="cpu", progress=False)
    apply_lora(model, "all-linear", r=16, alpha=32, dropout=0.05)
    enable_checkpointing(model)
    model.train()
    libc.malloc_trim()
    memory.end_phase("model load")
    summed, _ = CausalLMLoss(model, 1024)(input_ids=ids, labels=ids)
    summed.backward()
    libc.malloc_trim()
    memory.end_phase("first step")
    return memory.to_dict()


def child_peft(model_dir: str, data: str, steps: int, out: str) -> dict:
    """transformers + PEFT, the standard QLoRA stack."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_trainer.host_memory import HostMemory

    ids = _ids(model_dir, data)
    memory = HostMemory()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    memory.end_phase("model load")
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            memory.end_phase("first step")
    if steps > 1:
        memory.end_phase("steady state")
    model.save_pretrained(out)
    memory.end_phase("save")
    return memory.to_dict()


def _ids(model_dir: str, data: str):
    import torch
    from transformers import AutoTokenizer

    text = json.loads(Path(data).read_text().splitlines()[0])["text"]
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"][:SEQ_LEN]
    return torch.tensor([ids])


# ------------------------------------------------------------------------------------------------ parent

def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"child {args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train(model_dir: Path, data: Path, work: Path, steps: int) -> dict:
    out = work / f"run-{model_dir.name}"
    command = [sys.executable, "-m", "qlora_trainer", "train", str(ROOT / "configs" / "tiny.yaml"),
               f"model.path={model_dir}", f"data.path={data}", "data.format=text", f"data.max_seq_len={SEQ_LEN}",
               "data.eval_path=null", "model.compute_dtype=fp32", "lora.dropout=0.05",
               "train.optimizer=paged_adamw_8bit", f"train.max_steps={steps}", "train.batch_size=1",
               "train.grad_accum=1", "train.lr=2e-4", "train.warmup_steps=0", f"out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "QLORA_PROGRESS": "0"})
    if done.returncode:
        raise RuntimeError(f"train failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "host_memory.json").read_text())


def by_name(result: dict) -> dict[str, dict]:
    return {p["name"]: p for p in result["phases"]}


def rise_above_imports(result: dict) -> float:
    """The process's peak over every phase after the imports, above the resident memory the imports left."""
    phases = by_name(result)
    later = [p["peak_mib"] for p in result["phases"] if p["name"] != "imports"]
    return max(later) - phases["imports"]["end_mib"]


def table(dtype: str, size_mib: float, results: dict[str, dict]) -> str:
    names = list(results)
    lines = [f"checkpoint: hidden 1024, 16 layers, {dtype}, {size_mib:.0f} MiB of tensors; seq {SEQ_LEN}, batch 1, "
             f"r=16 all-linear; peak MiB (rise over the phase's start)",
             f"| {'phase':<13}| " + " | ".join(f"{n:>16}" for n in names) + " |",
             f"|{'-' * 14}|" + "|".join("-" * 17 + ":" for _ in names) + "|"]
    for phase in PHASES:
        cells = []
        for n in names:
            p = by_name(results[n]).get(phase)
            cells.append(f"{p['peak_mib']:6.0f} ({p['peak_mib'] - p['start_mib']:+5.0f})" if p else f"{'-':>16}")
        lines.append(f"| {phase:<13}| " + " | ".join(f"{c:>16}" for c in cells) + " |")
    lines.append(f"| {'above imports':<13}| " + " | ".join(f"{rise_above_imports(results[n]):16.0f}"
                                                           for n in names) + " |")
    parts = by_name(results["parts"])
    load = parts["model load"]["peak_mib"] - parts["imports"]["end_mib"]
    step = parts["first step"]["peak_mib"] - parts["first step"]["start_mib"]
    train_rise = rise_above_imports(results["train"])
    lines.append(f"train peaks {train_rise:.0f} MiB above its imports: {train_rise / (load + step):.2f} x (load "
                 f"{load:.0f} + one step {step:.0f}), {100 * train_rise / size_mib:.0f}% of the checkpoint")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="checkpoint dtypes, comma-separated (default fp32,bf16)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps of train and peft (default 2)")
    p.add_argument("--keep", type=Path, default=None, help="a folder to write (or reuse) the checkpoints in")
    p.add_argument("--no-peft", action="store_true", help="skip transformers + PEFT")
    p.add_argument("--json", type=Path, default=None, help="also write every phase as JSON here")
    p.add_argument("--_child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        kind, *rest = args._child
        result = child_parts(*rest) if kind == "parts" else child_peft(rest[0], rest[1], int(rest[2]), rest[3])
        print(json.dumps(result))
        return 0

    from make_random_checkpoint import make_random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-host-memory-"))
    keep = args.keep or work
    keep.mkdir(parents=True, exist_ok=True)
    data = write_rows(work / "rows.jsonl")
    everything = {}
    for dtype in args.dtypes.split(","):
        model_dir = keep / f"llama-1024x16-{dtype}"
        if not model_dir.is_dir():
            make_random_checkpoint(model_dir, dtype=dtype)
        size = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2**20
        results = {"train": run_train(model_dir, data, work, args.steps),
                   "parts": run_child(["--_child", "parts", str(model_dir), str(data)])}
        if not args.no_peft:
            results["peft"] = run_child(["--_child", "peft", str(model_dir), str(data), str(args.steps),
                                         str(work / f"peft-{dtype}")])
        everything[dtype] = results
        print(table(dtype, size, results) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
