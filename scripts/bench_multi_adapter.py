"""Cost of one mixed batch over 4 adapters (multi_adapter.py, S-LoRA style) vs four single-adapter batches.

    python scripts/bench_multi_adapter.py --threads 1     # CPU, a few minutes; --device cuda on a GPU

A random NF4 LLaMA (default: hidden 768, 4 layers), four random r=16 all-linear adapters, 16 rows = 4 per adapter.
  mixed       one forward of 16 rows; each MultiLoRALinear runs one pair of small matmuls per adapter present
  4 singles   four forwards of 4 rows, each on a plain LoRALinear model holding that row group's adapter
  base only   one forward of 16 rows without any adapter (the floor)
for a prefill (T tokens per row) and for one decode step (1 token per row over a KV cache of T tokens).
Prints one table; the median of --repeats rounds per cell (rounds interleave the cases).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig

from qlora_trainer.loading import random_quantized
from qlora_trainer.lora import apply_lora, lora_modules
from qlora_trainer.multi_adapter import AdapterRouting, MultiLoRALinear

ADAPTERS = ["a", "b", "c", "d"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _random_factors(model, r: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, layer in lora_modules(model).items():
        factors[name] = (torch.randn(r, layer.in_features, generator=gen) * 0.02,
                         torch.randn(layer.out_features, r, generator=gen) * 0.02)
    return factors


def _set_factors(model, factors) -> None:
    with torch.no_grad():
        for name, layer in lora_modules(model).items():
            layer.lora_A.copy_(factors[name][0])
            layer.lora_B.copy_(factors[name][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows-per-adapter", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's). On a shared machine 1 is steadier: busy OpenMP threads "
                             "competing with other processes for the cores distort every number")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), vocab_size=8192, max_position_embeddings=4096)

    # Single-adapter baseline: one plain LoRALinear model; each row group's adapter is copied in (untimed).
    single = random_quantized(config, device=device, progress=False)
    apply_lora(single, "all-linear", r=args.rank, alpha=2 * args.rank)
    single.eval()
    factors = {name: _random_factors(single, args.rank, seed) for seed, name in enumerate(ADAPTERS)}

    # The same base (same seed) with all four adapters in MultiLoRALinear layers.
    mixed = random_quantized(config, device=device, progress=False)
    routing = AdapterRouting(ADAPTERS)
    for path in lora_modules(single):
        layer = MultiLoRALinear(mixed.get_submodule(path), routing)
        for name in ADAPTERS:
            layer.add_adapter(name, *factors[name][path], scale=2.0)
        mixed.set_submodule(path, layer)
    mixed.eval()

    n, T = args.rows_per_adapter, args.seq_len
    rows = [name for name in ADAPTERS for _ in range(n)]
    B = len(rows)
    ids = torch.randint(0, config.vocab_size, (B, T), device=device)  # (B, T)
    step_ids = torch.randint(0, config.vocab_size, (B, 1), device=device)  # (B, 1)

    def decode_step(model, prompt, step):
        """One decode step over a prefilled KV cache, which is cropped back afterwards so it can repeat."""
        cache = DynamicCache(config=model.config)
        model(prompt, cache=cache, use_cache=True)
        return lambda: (model(step, cache=cache, use_cache=True, logits_to_keep=1), cache.crop(-1))

    def routed(names, run):
        return lambda: routing.set_rows(names, device), run

    def with_adapter(name, run):
        return lambda: _set_factors(single, factors[name]), run

    with torch.no_grad():
        part = [slice(i * n, (i + 1) * n) for i in range(len(ADAPTERS))]
        cases = {  # (phase, setup) -> [(untimed preparation, timed call), ...]; a case's time is the sum of its calls
            ("prefill", "mixed"): [routed(rows, lambda: mixed(ids))],
            ("prefill", "4 singles"): [with_adapter(a, lambda p=p: single(ids[p])) for a, p in zip(ADAPTERS, part)],
            ("prefill", "base only"): [routed([None] * B, lambda: mixed(ids))],
        }
        routing.set_rows(rows, device)
        cases["decode", "mixed"] = [routed(rows, decode_step(mixed, ids, step_ids))]
        cases["decode", "4 singles"] = []
        for a, p in zip(ADAPTERS, part):
            _set_factors(single, factors[a])
            cases["decode", "4 singles"].append(with_adapter(a, decode_step(single, ids[p], step_ids[p])))
        routing.set_rows([None] * B, device)
        cases["decode", "base only"] = [routed([None] * B, decode_step(mixed, ids, step_ids))]

        # Rounds interleave the cases, so that load from other processes slows all of them alike.
        times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for key, calls in cases.items():
                total = 0.0
                for prepare, run in calls:
                    prepare()
                    _sync(device)
                    start = time.perf_counter()
                    run()
                    _sync(device)
                    total += time.perf_counter() - start
                if round_ > 0:
                    times[key].append(total)
        results = {key: statistics.median(values) for key, values in times.items()}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"random NF4 LLaMA: hidden {args.hidden}, {args.layers} layers, all-linear LoRA r={args.rank}; "
          f"{len(ADAPTERS)} adapters x {n} rows = {B} rows; T={T}; {name}; median of {args.repeats}")
    print(f"{'phase':<9} {'mixed (1 batch)':>16} {'4 single batches':>17} {'base only':>10} {'singles/mixed':>14} "
          f"{'LoRA overhead (mixed)':>22}")
    for phase, what in (("prefill", f"{T} tok/row"), ("decode", "1 tok/row")):
        m, s, b = (results[phase, k] for k in ("mixed", "4 singles", "base only"))
        print(f"{phase:<9} {m * 1e3:>13.1f} ms {s * 1e3:>14.1f} ms {b * 1e3:>7.1f} ms {s / m:>13.2f}x "
              f"{100 * (m - b) / b:>21.1f}%   ({what})")


if __name__ == "__main__":
    main()
