"""Ours vs the standard QLoRA stack (transformers + bitsandbytes NF4 + PEFT), side by side in one process.

    python scripts/bench.py                 # CPU: the shipped tiny model, step time and tokens/s, ours vs baseline
                                            # (on a shared machine prefix OMP_NUM_THREADS=1: steadier numbers)
    python scripts/bench.py --quick         # the smoke form tests/test_bench.py runs
    python scripts/bench.py --gpu           # GPU: Llama-3-8B and -70B shapes, random NF4 weights (see BENCHMARKS.md)

Both sides train the same frozen NF4 weights (double quantization, blocksize 64), the same LoRA (rank 16,
alpha 32, no dropout, every linear layer but lm_head, the same initial A and B copied from ours into PEFT),
on the same batch, with gradient checkpointing, torch AdamW and grad-norm clipping at 1.0.

  ours:     qlora_trainer: load_quantized / random_quantized + apply_lora + enable_checkpointing +
            CausalLMLoss (chunked cross-entropy) + train.train_step, exactly as `qlora-trainer train` runs it.
  baseline: transformers' LlamaForCausalLM with bitsandbytes Linear4bit + peft.get_peft_model(LoraConfig(
            target_modules="all-linear")) + a plain loop on transformers' own loss (model(..., labels=).loss),
            under bf16 autocast on GPU (what Trainer(bf16=True) does). prepare_model_for_kbit_training is not
            called: it would upcast norms and embeddings to fp32, a slower, larger baseline than the one we beat.

Baseline weights. CPU: the checkpoint loaded by transformers itself, from_pretrained(quantization_config=
BitsAndBytesConfig(nf4, double quant, fp32 compute)). GPU: no checkpoint exists (and a 70B bf16 tensor set
must never exist), so the baseline model is built with `random_quantized` from the same seed as ours (the
same packed NF4 bits: bnb.nn.Linear4bit modules in transformers' own LlamaForCausalLM, which is exactly what
transformers' bitsandbytes integration builds) and then carries what from_pretrained leaves on a 4-bit model
(hf_quantizer, is_loaded_in_4bit, config.quantization_config), so PEFT wraps it with the same bnb LoRA
layers it would use after from_pretrained. tests/test_bench.py checks that on CPU.

Output: a table printed last, full JSON to $OUT/bench.json (the device tool collects $OUT) or --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qlora_trainer.loading import load_quantized, random_quantized  # noqa: E402
from qlora_trainer.lora import apply_lora, lora_modules, lora_state_dict  # noqa: E402
from qlora_trainer.loss import CausalLMLoss  # noqa: E402
from qlora_trainer.quant import make_optimizer  # noqa: E402
from qlora_trainer.training import enable_checkpointing, train_step  # noqa: E402

TINY = ROOT / "assets" / "tiny-llama"
LR = 2e-4
MAX_GRAD_NORM = 1.0

# Public config numbers (meta-llama/Meta-Llama-3-8B and -70B config.json).
LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1 << 20, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
              bos_token_id=128000, eos_token_id=128001, hidden_act="silu", attention_bias=False, mlp_bias=False)
GPU_MODELS = {
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
# (batch, seq_len) per model: seq 2048 at batch 1 and a larger batch, and a longer sequence.
GPU_SHAPES = {"8b": [(1, 2048), (4, 2048), (1, 8192)], "70b": [(1, 2048), (2, 2048), (1, 8192)]}
CPU_SHAPES = [(1, 256), (4, 256), (1, 512)]
QUICK_SHAPES = [(1, 32)]


@dataclass
class Result:
    impl: str  # ours | baseline
    model: str
    batch: int
    seq_len: int
    status: str = "ok"  # ok | OOM | error: ...
    step_s: float | None = None  # median
    tokens_per_s: float | None = None
    losses: list[float] = field(default_factory=list)
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated (GPU)
    estimate_gib: float | None = None  # estimate_memory(...).allocated (GPU, ours)
    mfu: float | None = None
    rss_setup_mib: float | None = None  # CPU, --rss: resident memory after loading, before any step
    rss_growth_mib: float | None = None  # CPU, --rss: peak resident memory during training minus rss_setup


# ------------------------------------------------------------------------------------------ models

def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**GPU_MODELS[name])


def bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def base_model(model: str, impl: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The frozen NF4 base: the tiny checkpoint on CPU, random weights of a Llama-3 shape on GPU."""
    if model == "tiny":
        if impl == "ours":
            return load_quantized(TINY, compute_dtype=dtype, device=device, progress=False)
        return transformers_from_pretrained(TINY, dtype, device)
    m = random_quantized(llama_config(model), compute_dtype=dtype, device=device, seed=seed, progress=False)
    return m if impl == "ours" else as_transformers_4bit(m, dtype)


def transformers_from_pretrained(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(dtype), dtype=dtype,
                                                 device_map=str(device))
    _exact_cpu_nf4(model)
    return model


def as_transformers_4bit(model, dtype: torch.dtype):
    """Mark a model of bnb Linear4bit layers the way from_pretrained(quantization_config=...) does, so PEFT
    (which reads is_loaded_in_4bit and hf_quantizer) treats it exactly as a transformers 4-bit load."""
    from transformers.quantizers import AutoHfQuantizer

    config = bnb_config(dtype)
    model.config.quantization_config = config
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    model.is_quantized = True
    model.is_loaded_in_4bit = True
    model.quantization_method = config.quant_method
    _exact_cpu_nf4(model)
    return model


def _exact_cpu_nf4(model) -> None:
    """On CPU bitsandbytes would repack weights for a bf16 kernel in no-grad mode; ours never does."""
    from qlora_trainer import quant

    for module in model.modules():
        if quant.is_nf4_linear(module):
            module.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------------------------------ the two trainers

class Ours:
    def __init__(self, base, rank: int, lora_init: dict[str, torch.Tensor] | None, loss_chunk_size: int,
                 seed: int = 0):
        from accelerate import Accelerator

        torch.manual_seed(seed)
        self.model = base
        apply_lora(base, "all-linear", r=rank, alpha=2 * rank, dropout=0.0)
        if lora_init is not None:
            load_lora_init(self.model, lora_init)
        enable_checkpointing(base)
        base.train()
        self.params = list(lora_state_dict(base).values())
        self.optimizer = make_optimizer("adamw", self.params, LR, 0.0)
        self.loss_model = CausalLMLoss(base, loss_chunk_size)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")

    def step(self, batch: dict) -> float:
        loss, _, _ = train_step(self.loss_model, [batch], self.optimizer, self.params, LR, MAX_GRAD_NORM,
                                self.accelerator)
        return loss

    def lora_init(self) -> dict[str, torch.Tensor]:
        """{module path: (A, B)} on CPU, to start the baseline from the same adapter."""
        return {name: (m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone())
                for name, m in lora_modules(self.model).items()}


def load_lora_init(model, init: dict) -> None:
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.copy_(init[name][0])
            m.lora_B.copy_(init[name][1])


def load_peft_lora_init(peft_model, init: dict) -> None:
    """Copy {module path: (A, B)} into a PEFT model's "default" adapter."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (a, b) in init.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)


class Baseline:
    def __init__(self, base, rank: int, lora_init: dict | None):
        from peft import LoraConfig, get_peft_model

        enable_checkpointing(base)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config)
        if lora_init is not None:
            load_peft_lora_init(self.model, lora_init)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.device = self.params[0].device

    def step(self, batch: dict) -> float:
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def make_batch(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------------ timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(trainer, batch: dict, device: torch.device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """(losses of every step, seconds of each timed step)."""
    losses, times = [], []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        losses.append(trainer.step(batch))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return losses, times


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_trainer(impl: str, model: str, device, dtype, rank: int, lora_init, chunk: int):
    base = base_model(model, impl, device, dtype)
    return Ours(base, rank, lora_init, chunk) if impl == "ours" else Baseline(base, rank, lora_init)


def run_shape(trainer, res: Result, vocab: int, device, warmup: int, steps: int, flops_per_token: float | None,
              peak_flops: float | None) -> Result:
    batch = make_batch(vocab, res.batch, res.seq_len, device)
    free_memory(device)
    try:
        losses, times = time_steps(trainer, batch, device, warmup, steps)
    except RuntimeError as err:
        trainer.optimizer.zero_grad(set_to_none=True)
        res.status = "OOM" if is_oom(err) else f"error: {str(err).splitlines()[0][:80]}"
        del err
        free_memory(device)
        return res
    res.losses = [round(x, 6) for x in losses]
    res.step_s = statistics.median(times)
    res.tokens_per_s = res.batch * res.seq_len / res.step_s
    if device.type == "cuda":
        res.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        if flops_per_token and peak_flops:
            res.mfu = res.tokens_per_s * flops_per_token / peak_flops
    return res


def fresh_state(trainer, init: dict) -> None:
    """Every shape starts from the same adapter and a fresh optimizer, so losses compare across ours/baseline."""
    if isinstance(trainer, Ours):
        load_lora_init(trainer.model, init)
    else:
        load_peft_lora_init(trainer.model, init)
    trainer.optimizer.state.clear()


# ------------------------------------------------------------------------------------------ GPU extras

def peak_bf16_flops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def param_count(model_name: str) -> int:
    cfg = GPU_MODELS[model_name]
    h, i, n_layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h
    return n_layers * per_layer + 2 * v * h + h


def estimate_gib(model_name: str, batch: int, seq_len: int, rank: int, chunk: int) -> float:
    from qlora_trainer.estimate import RunSettings, estimate_memory

    run = RunSettings(seq_len=seq_len, batch_size=batch, rank=rank, optimizer="adamw", loss_chunk_size=chunk,
                      compute_dtype="bf16", lora_dropout=0.0)
    return estimate_memory(llama_config(model_name).to_dict(), run).allocated / 2**30


def max_seq_estimate(model_name: str, rank: int, chunk: int) -> int:
    """The estimator's longest seq_len at batch 1 for this card's memory (what the allocator can hand out)."""
    from qlora_trainer.estimate import RunSettings, max_seq_len_that_fits

    run = RunSettings(seq_len=2048, batch_size=1, rank=rank, optimizer="adamw", loss_chunk_size=chunk,
                      compute_dtype="bf16", lora_dropout=0.0)
    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return max_seq_len_that_fits(card_gib, llama_config(model_name).to_dict(), run)


def longest_seq(trainer, vocab: int, device, start: int, step: int, cap: int, budget_s: float,
                growth: float = 2.0) -> dict:
    """Longest seq_len (batch 1, multiple of `step`) for which one full training step (forward, backward,
    optimizer) fits: grow from `start` by `growth` until a step fails, then bisect to within max(step, 3%).
    Stops early when budget_s is spent: then `fits` is a lower bound."""
    began = time.perf_counter()
    tries = []

    def fits(t: int) -> bool:
        batch = make_batch(vocab, 1, t, device)
        free_memory(device)
        try:
            trainer.step(batch)
            ok = True
        except RuntimeError as err:
            if not is_oom(err):
                raise
            ok = False
            del err
        trainer.optimizer.zero_grad(set_to_none=True)
        del batch
        free_memory(device)
        tries.append((t, ok, round(time.perf_counter() - began, 1)))
        return ok

    lo, hi = 0, None
    t = start
    while t <= cap and time.perf_counter() - began < budget_s:
        if fits(t):
            lo, t = t, max(t + step, int(t * growth) // step * step)
        else:
            hi = t
            break
    if hi is None and lo >= cap:
        return {"fits": lo, "exact": False, "note": f"reached cap {cap}", "tries": tries}
    def close() -> bool:
        return hi - lo <= max(step, lo // 32)

    while hi is not None and not close() and time.perf_counter() - began < budget_s:
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            hi = mid
    exact = hi is not None and close()
    return {"fits": lo, "fails": hi, "exact": exact, "tries": tries,
            "note": "" if exact else "time budget spent: fits is a lower bound"}


# ------------------------------------------------------------------------------------------ runs

def bench_model(model: str, shapes, device, dtype, args, results: list, extra: dict, save) -> None:
    gpu = device.type == "cuda"
    vocab = GPU_MODELS[model]["vocab_size"] if gpu else json.loads((TINY / "config.json").read_text())["vocab_size"]
    flops_per_token = 6 * param_count(model) if gpu else None
    init = None
    for impl in args.impls:
        free_memory(device)
        trainer = make_trainer(impl, model, device, dtype, args.rank, init, args.loss_chunk_size)
        if init is None:
            init = trainer.lora_init() if impl == "ours" else None
        if init is None:
            raise SystemExit("--impl: put ours first (the baseline starts from ours' adapter)")
        if gpu:
            extra.setdefault("weights_gib", {})[f"{model}/{impl}"] = torch.cuda.memory_allocated() / 2**30
        for b, t in ([] if args.maxlen_only else shapes):
            if time.perf_counter() > args.deadline:
                results.append(Result(impl, model, b, t, status="skipped (deadline)"))
                continue
            fresh_state(trainer, init)
            res = Result(impl, model, b, t)
            if gpu and impl == "ours":
                res.estimate_gib = estimate_gib(model, b, t, args.rank, args.loss_chunk_size)
            results.append(run_shape(trainer, res, vocab, device, args.warmup, args.steps, flops_per_token,
                                     extra.get("peak_bf16_flops")))
            save()
        if gpu and args.maxlen and time.perf_counter() < args.deadline:
            fresh_state(trainer, init)
            budget = min(args.maxlen_budget_s, args.deadline - time.perf_counter())
            start, growth = 2048, 2.0
            if impl == "ours":  # start just under the estimator's answer: fewer (long, slow) tries
                start = max(2048, int(0.9 * max_seq_estimate(model, args.rank, args.loss_chunk_size))
                            // args.maxlen_step * args.maxlen_step)
                growth = 1.25
            found = longest_seq(trainer, vocab, device, start, args.maxlen_step, args.maxlen_cap, budget, growth)
            extra.setdefault("longest_seq", {})[f"{model}/{impl}"] = found
            save()
        del trainer
        free_memory(device)


def bench_cpu_interleaved(shapes, device, dtype, args, results: list) -> None:
    """CPU: both models fit side by side, so each timed step of ours is followed by one of the baseline on the
    same batch. Whatever else loads the machine then slows both alike, and the ratio stays fair."""
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    ours = make_trainer("ours", "tiny", device, dtype, args.rank, None, args.loss_chunk_size)
    init = ours.lora_init()
    base = make_trainer("baseline", "tiny", device, dtype, args.rank, init, args.loss_chunk_size)
    trainers = {"ours": ours, "baseline": base}
    for b, t in shapes:
        batch = make_batch(vocab, b, t, device)
        runs = {impl: Result(impl, "tiny", b, t) for impl in trainers}
        times: dict[str, list[float]] = {impl: [] for impl in trainers}
        for trainer in trainers.values():
            fresh_state(trainer, init)
        for i in range(args.warmup + args.steps):
            for impl, trainer in trainers.items():
                start = time.perf_counter()
                runs[impl].losses.append(round(trainer.step(batch), 6))
                if i >= args.warmup:
                    times[impl].append(time.perf_counter() - start)
        for impl, res in runs.items():
            res.step_s = statistics.median(times[impl])
            res.tokens_per_s = b * t / res.step_s
        results.extend(runs.values())


def rss_child(impl: str, batch: int, seq_len: int, warmup: int, steps: int, rank: int, chunk: int) -> dict:
    """Run in a fresh process: resident memory after setup, and the peak during training (Linux)."""
    device, dtype = torch.device("cpu"), torch.float32
    trainer = make_trainer(impl, "tiny", device, dtype, rank, None, chunk)
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    batch_ = make_batch(vocab, batch, seq_len, device)
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    setup = int(Path("/proc/self/statm").read_text().split()[1]) * page
    time_steps(trainer, batch_, device, warmup, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_setup_mib": setup / 2**20, "rss_growth_mib": max(0, peak - setup) / 2**20}


def measure_rss(results: list[Result], args) -> None:
    for res in results:
        if res.status != "ok":
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_rss-child", res.impl, str(res.batch),
               str(res.seq_len), "--warmup", str(args.warmup), "--steps", str(min(args.steps, 3)),
               "--rank", str(args.rank), "--loss-chunk-size", str(args.loss_chunk_size)]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the timing
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        res.rss_setup_mib, res.rss_growth_mib = row["rss_setup_mib"], row["rss_growth_mib"]


def table(results: list[Result], extra: dict) -> str:
    gpu = extra["device"] == "cuda"
    head = f"{'model':5} {'batch':>5} {'seq':>6} {'impl':9} {'step s':>8} {'tok/s':>9} {'x base':>6} {'loss0':>8}"
    head += f" {'peak GiB':>8} {'est GiB':>7} {'MFU':>6}" if gpu else f" {'RSS+ MiB':>8}"
    lines = [head]
    base = {(r.model, r.batch, r.seq_len): r for r in results if r.impl == "baseline" and r.status == "ok"}
    for r in results:
        if r.status != "ok":
            lines.append(f"{r.model:5} {r.batch:5d} {r.seq_len:6d} {r.impl:9} {r.status}")
            continue
        b = base.get((r.model, r.batch, r.seq_len))
        ratio = f"{r.tokens_per_s / b.tokens_per_s:6.2f}" if b else f"{'-':>6}"
        line = f"{r.model:5} {r.batch:5d} {r.seq_len:6d} {r.impl:9} {r.step_s:8.4f} {r.tokens_per_s:9.1f} {ratio} " \
               f"{r.losses[0]:8.4f}"
        if gpu:
            est = f"{r.estimate_gib:7.2f}" if r.estimate_gib is not None else f"{'-':>7}"
            mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else f"{'-':>6}"
            line += f" {r.peak_mem_gib:8.2f} {est} {mfu}"
        else:
            line += f" {r.rss_growth_mib:8.1f}" if r.rss_growth_mib is not None else f" {'n/m':>8}"
        lines.append(line)
    for key, found in extra.get("longest_seq", {}).items():
        bound = "" if found.get("exact") else " (lower bound)"
        lines.append(f"longest seq (batch 1) {key}: {found['fits']}{bound}"
                     + (f", fails at {found['fails']}" if found.get("fails") else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU mode (the default when CUDA is available)")
    p.add_argument("--cpu", action="store_true", help="CPU mode even when CUDA is available")
    p.add_argument("--quick", action="store_true", help="smoke form: one small shape, 1 warm-up, 2 timed steps")
    p.add_argument("--models", default="8b,70b", help="GPU models, comma-separated: 8b,70b")
    p.add_argument("--shapes", default=None, help="batch x seq_len list, e.g. 1x2048,4x2048")
    p.add_argument("--impl", default="ours,baseline", dest="impls_arg")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-maxlen", dest="maxlen", action="store_false", help="GPU: skip the longest-seq search")
    p.add_argument("--maxlen-only", action="store_true", help="GPU: only the longest-seq search")
    p.add_argument("--maxlen-step", type=int, default=1024)
    p.add_argument("--maxlen-cap", type=int, default=262144)
    p.add_argument("--maxlen-budget-s", type=float, default=240, help="GPU: seconds per longest-seq search")
    p.add_argument("--time-budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: peak RSS growth per run, each in its own subprocess (default: on unless --quick)")
    p.add_argument("--json", type=Path, default=None, help="where to write the full JSON (default $OUT/bench.json)")
    p.add_argument("--_rss-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.impls = args.impls_arg.split(",")
    args.deadline = time.perf_counter() + args.time_budget_s
    if args.quick:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    if args._rss_child:
        impl, b, t = args._rss_child
        print(json.dumps(rss_child(impl, int(b), int(t), args.warmup, args.steps, args.rank, args.loss_chunk_size)))
        return []
    gpu = (args.gpu or torch.cuda.is_available()) and not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available here")
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    extra: dict = {"device": device.type, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "rank": args.rank, "warmup": args.warmup, "steps": args.steps,
                   "loss_chunk_size": args.loss_chunk_size, "command": " ".join(sys.argv)}
    if gpu:
        extra["card"] = torch.cuda.get_device_name()
        extra["peak_bf16_flops"] = peak_bf16_flops(device)
    else:
        extra["card"] = f"CPU, {os.cpu_count()} cores"
    results: list[Result] = []
    out_path = args.json or (Path(os.environ["OUT"]) / "bench.json" if os.environ.get("OUT") else None)

    def save() -> None:
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({"meta": extra, "runs": [dataclasses.asdict(r) for r in results]}, indent=1))

    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if gpu:
        for model in args.models.split(","):
            bench_model(model, shapes if args.shapes else GPU_SHAPES[model], device, dtype, args, results, extra,
                        save)
    else:
        cpu_shapes = shapes if args.shapes else (QUICK_SHAPES if args.quick else CPU_SHAPES)
        bench_cpu_interleaved(cpu_shapes, device, dtype, args, results)
        if args.rss if args.rss is not None else not args.quick:
            measure_rss(results, args)
    save()
    print(table(results, extra))
    return results


if __name__ == "__main__":
    main()
