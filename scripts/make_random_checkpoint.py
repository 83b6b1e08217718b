"""Write a LLaMA-shaped checkpoint with random weights, tensor by tensor, for memory benchmarks and tests.

    python scripts/make_random_checkpoint.py /tmp/llama-1024x16              # hidden 1024, 16 layers, fp32 (~690 MiB)
    python scripts/make_random_checkpoint.py /tmp/llama-bf16 --dtype bf16    # the same shape in bf16 (~345 MiB)
    python scripts/make_random_checkpoint.py /tmp/small --hidden 256 --layers 4 --intermediate 704

The folder is what `model.path` takes: config.json (LlamaForCausalLM; grouped-query attention, 4 key/value heads),
sharded safetensors with model.safetensors.index.json (`--shard-size`, default 200MB), and the tiny LLaMA's
tokenizer (assets/tiny-llama), whose vocabulary sets vocab_size. No model object is ever built: each tensor is drawn
and written on its own (qlora_trainer.shards.ShardWriter), so making a checkpoint costs one tensor of memory.
The weights are N(0, 0.02) (norms 1), from a fixed seed: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qlora_trainer.names import torch_dtype  # noqa: E402
from qlora_trainer.shards import ShardWriter, itemsize, parse_size, shard_name  # noqa: E402

TOKENIZER_FROM = ROOT / "assets" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def llama_shapes(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LlamaForCausalLM (untied lm_head), in the order transformers saves them."""
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Tensors in order, cut into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize(dtype)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def make_random_checkpoint(folder: Path, *, hidden: int = 1024, layers: int = 16, intermediate: int = 2816,
                           heads: int = 16, kv_heads: int = 4, dtype: str = "fp32", shard_size: str | int = "200MB",
                           seed: int = 0) -> int:
    """Write the checkpoint into `folder` (created; must not exist). Returns the bytes of its tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_FROM / name).is_file():
            shutil.copy(TOKENIZER_FROM / name, folder / name)
    tiny = json.loads((TOKENIZER_FROM / "config.json").read_text())
    vocab = tiny["vocab_size"]
    config = {**tiny, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
              "max_position_embeddings": 4096, "dtype": {"fp32": "float32", "bf16": "bfloat16",
                                                         "fp16": "float16"}[dtype]}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch_type = torch_dtype(dtype)
    shapes = llama_shapes(hidden, layers, intermediate, heads, kv_heads, vocab)
    shards = _plan_shards(shapes, torch_type, parse_size(shard_size))
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = shard_name(i, len(shards))
        writer = ShardWriter(folder / name, [(k, shapes[k], torch_type) for k in keys])
        for key in keys:
            if key.endswith("norm.weight"):
                tensor = torch.ones(shapes[key], dtype=torch_type)
            else:
                tensor = (torch.randn(shapes[key], generator=generator) * 0.02).to(torch_type)
            writer.write(key, tensor)
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        writer.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder to write (must not exist)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--shard-size", default="200MB", help="largest shard (default 200MB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists: choose a new folder")
    total = make_random_checkpoint(args.out, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                                   heads=args.heads, kv_heads=args.kv_heads, dtype=args.dtype,
                                   shard_size=args.shard_size, seed=args.seed)
    print(f"{args.out}: {total / 2**20:.1f} MiB of {args.dtype} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
