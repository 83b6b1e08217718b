"""Memory of a mixture-of-experts model: ours (NF4 experts) against transformers + bitsandbytes (experts left in
bf16), in one process, on the CPU.

    python scripts/bench_moe_memory.py                  # a random Mixtral-shaped model of ~450 MB (bf16), 4 layers
    python scripts/bench_moe_memory.py --layers 2 --experts 4 --hidden 512     # smaller and faster

A random checkpoint is written once (bf16, per-expert layout as Mixtral is published, 100MB shards) into a temporary
folder; then each side, one after the other in this process:

  load   from_pretrained / load_quantized of that folder, compute dtype bf16
  step   one training step: LoRA r=16 on the attention projections (ours: apply_lora; transformers: PEFT
         get_peft_model), gradient checkpointing, AdamW, batch 1 x --seq-len tokens

  ours:         load_quantized (experts in NF4, eager experts), CausalLMLoss, training.train_step
  transformers: AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)), which
                quantizes the nn.Linear layers (attention) and keeps the 3-D expert parameters in bf16

Columns: weights = bytes of every parameter and buffer the loaded model holds (packed NF4 + statistics for 4-bit
ones); load peak / step 1 peak / step 2 peak = the most resident memory (RSS, sampled every millisecond by a thread)
above what the process held before that phase, in MiB (step 1 also creates the optimizer state). The ratio row is
ours / transformers. Allocations of 128 KiB or more go to mmap and back to the OS when freed (glibc's mallopt
M_MMAP_THRESHOLD, fixed at start): otherwise glibc keeps freed heap blocks and RSS would count what its allocator
retains (ours dequantizes one expert at a time, many short-lived blocks) rather than what tensors hold.
"""

from __future__ import annotations

import argparse
import gc
import warnings
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_trainer import libc, quant  # noqa: E402
from qlora_trainer.experts import is_nf4_experts  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def return_freed_memory_to_the_os() -> None:
    import ctypes

    mallopt = getattr(ctypes.CDLL("libc.so.6"), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, which also stops glibc from raising it on its own


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


class PeakRSS:
    """The highest RSS above the starting one while the block runs, sampled by a thread every millisecond."""

    def __enter__(self):
        gc.collect()
        libc.malloc_trim()
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.start


def model_bytes(model) -> int:
    """Bytes of the model's weights as stored: 4-bit linears by their packed codes and statistics, NF4 experts by
    their buffers, everything else by its tensors (a tied weight once)."""
    seen, total = set(), 0
    for module in model.modules():
        if quant.is_nf4_linear(module):
            total += quant.quantized_bytes(module) + (module.bias.numel() * module.bias.element_size()
                                                      if module.bias is not None else 0)
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        if is_nf4_experts(module):
            total += module.nbytes()
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def write_checkpoint(folder: Path, args) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.expert_size, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                           num_local_experts=args.experts, num_experts_per_tok=2, vocab_size=args.vocab,
                           max_position_embeddings=4096)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="100MB")  # transformers writes Mixtral's per-expert layout
    del model
    return folder


def batch(vocab: int, seq_len: int) -> dict:
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def ours(folder: Path, data: dict) -> dict:
    from accelerate import Accelerator

    from qlora_trainer.loading import load_quantized
    from qlora_trainer.lora import apply_lora
    from qlora_trainer.loss import CausalLMLoss
    from qlora_trainer.training import enable_checkpointing, train_step

    with PeakRSS() as load:
        model = load_quantized(folder, compute_dtype="bf16", device="cpu", progress=False)
    weights = model_bytes(model)
    apply_lora(model, ATTENTION, r=16, alpha=32)
    model.train()
    enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss, accelerator = CausalLMLoss(model), Accelerator(cpu=True)
    steps = []
    for _ in range(2):
        with PeakRSS() as step:
            train_step(loss, [data], optimizer, params, 1e-4, 1.0, accelerator)
        steps.append(step.growth)
    del model, optimizer, params, loss
    return {"weights": weights, "load": load.growth, "step1": steps[0], "step2": steps[1]}


def transformers_bnb(folder: Path, data: dict) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    with PeakRSS() as load:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map="cpu")
    weights = model_bytes(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION, lora_dropout=0.0,
                                                  task_type="CAUSAL_LM"))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    steps = []
    for _ in range(2):
        with PeakRSS() as step:
            peft_model(**data).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps.append(step.growth)
    del model, peft_model, optimizer, params
    return {"weights": weights, "load": load.growth, "step1": steps[0], "step2": steps[1]}


def table(rows: dict[str, dict]) -> str:
    mib = 2**20
    columns = {"weights": "weights", "load": "load peak", "step1": "step 1 peak", "step2": "step 2 peak"}
    lines = ["| | " + " | ".join(f"{c} (MiB)" for c in columns.values()) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k] / mib:.1f}" for k in columns) + " |")
    a, b = rows["ours"], rows["transformers + bitsandbytes"]
    lines.append("| ours / transformers | " + " | ".join(f"{a[k] / b[k]:.2f}x" for k in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-size", type=int, default=1024, help="each expert's intermediate size")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing_enable rename
    return_freed_memory_to_the_os()
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        folder = write_checkpoint(Path(tmp) / "model", args)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"checkpoint: Mixtral-shaped, {args.layers} layers x {args.experts} experts, hidden {args.hidden}, "
              f"expert size {args.expert_size}, vocab {args.vocab}: {size / 2**20:.0f} MiB bf16 (per-expert layout)")
        data = batch(args.vocab, args.seq_len)
        rows = {"transformers + bitsandbytes": transformers_bnb(folder, data)}
        gc.collect()
        libc.malloc_trim()
        rows["ours"] = ours(folder, data)
    print(table(rows))


if __name__ == "__main__":
    main()
