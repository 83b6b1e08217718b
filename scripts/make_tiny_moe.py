"""Tiny random checkpoints of the mixture-of-experts architectures (and Gemma 2), saved sharded in bf16 as they are
published, with a byte-level BPE tokenizer like scripts/make_tiny_model.py's.

    python scripts/make_tiny_moe.py runs/tiny-moe                       # every architecture, every layout
    python scripts/make_tiny_moe.py runs/tiny-moe --arch mixtral --layout per_expert   # one of them

writes OUT/ARCH-LAYOUT/ (OUT/gemma2/ for the dense Gemma 2): config.json, model-0000N-of-0000M.safetensors + index,
tokenizer files. The two expert layouts:

- per_expert: one 2-D tensor per expert and projection (Mixtral `block_sparse_moe.experts.N.w1.weight`, Qwen
  `mlp.experts.N.gate_proj.weight`): how Mixtral and Qwen-MoE are published, and what transformers 5's
  `save_pretrained` writes for them (it reverts its weight conversion on save).
- fused: transformers 5's 3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), written here with
  safetensors from the model's own state_dict. transformers has no per-expert form for gpt-oss (`save_pretrained`
  writes it fused, as its bf16 release is).
- mxfp4 (gpt-oss only): the experts as OpenAI publishes gpt-oss, MXFP4 codes and scales (`gate_up_proj_blocks`
  uint8 [E, out, in/32, 16], `gate_up_proj_scales` uint8 [E, out, in/32]) with a `quantization_config`; random
  codes, not a quantization of the other layout's weights.

Every width is a multiple of 64 (NF4's blocksize). Importing this module does no work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import build_tokenizer, synthetic_corpus  # noqa: E402

PER_EXPERT, FUSED, MXFP4 = "per_expert", "fused", "mxfp4"
LAYOUTS = {"mixtral": (PER_EXPERT, FUSED), "qwen3_moe": (PER_EXPERT, FUSED), "qwen2_moe": (PER_EXPERT, FUSED),
           "gpt_oss": (FUSED, MXFP4), "gemma2": (FUSED,)}  # gemma2 is dense: "fused" only names its one layout
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2)


def _config(arch: str, vocab_size: int, bos: int, eos: int):
    from transformers import (Gemma2Config, GptOssConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig)

    ids = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    if arch == "mixtral":
        return MixtralConfig(**SHAPE, **MOE, **ids, intermediate_size=128, num_local_experts=4)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**SHAPE, **MOE, **ids, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
                              num_experts=4, norm_topk_prob=True)
    if arch == "qwen2_moe":  # with its shared expert and the shared expert's sigmoid gate
        return Qwen2MoeConfig(**SHAPE, **MOE, **ids, intermediate_size=256, moe_intermediate_size=128,
                              shared_expert_intermediate_size=256, num_experts=4)
    if arch == "gpt_oss":
        rope = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                    truncate=False, original_max_position_embeddings=SHAPE["max_position_embeddings"] // 32)
        return GptOssConfig(**SHAPE, **MOE, **ids, head_dim=32, intermediate_size=128, num_local_experts=4,
                            sliding_window=16, rope_parameters=rope)
    if arch == "gemma2":
        return Gemma2Config(**SHAPE, **ids, head_dim=32, intermediate_size=256, sliding_window=16, pad_token_id=eos)
    raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(LAYOUTS)}")


def tokenizer(n_docs: int = 300, vocab_size: int = 512):
    """A byte-level BPE with a chat template, trained on a small synthetic corpus (a second or two)."""
    return build_tokenizer(synthetic_corpus(n_docs, seed=0), vocab_size=vocab_size)


def make_tiny_moe(out_dir: str | Path, arch: str, layout: str = PER_EXPERT, *, seed: int = 0,
                  max_shard_size: str = "200KB", tok=None) -> Path:
    """Write one random tiny checkpoint (bf16, sharded) and its tokenizer to out_dir; return out_dir."""
    from transformers import AutoModelForCausalLM

    if layout not in LAYOUTS.get(arch, ()):
        raise ValueError(f"{arch} has no {layout!r} layout here: use one of {', '.join(LAYOUTS.get(arch, ()))}")
    tok = tok or tokenizer()
    config = _config(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if layout in (FUSED, MXFP4) and arch != "gemma2":
        # save_pretrained reverted the experts to the per-expert layout where transformers has a mapping for the
        # architecture: write the model's own (fused) tensors instead.
        for old in out.glob("model*.safetensors*"):
            old.unlink()
        state = model.state_dict()
        if layout == MXFP4:
            state = _as_mxfp4(state, seed)
            config_file = out / "config.json"
            config = json.loads(config_file.read_text())
            config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
            config_file.write_text(json.dumps(config, indent=2) + "\n")
        write_sharded(state, out, max_shard_size)
    tok.save_pretrained(out)
    return out


def _as_mxfp4(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each 3-D expert weight [E, in, out] (gpt-oss multiplies x @ W) -> random MXFP4 `_blocks` (two 4-bit codes per
    byte, 32 values per block) and `_scales` (a power-of-two exponent per block, biased by 127; 2**-8..2**-5 keeps
    the values near the model's initialization)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if not (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
            out[name] = tensor
            continue
        experts, rows_in, rows_out = tensor.shape
        out[name + "_blocks"] = torch.randint(0, 256, (experts, rows_out, rows_in // 32, 16), generator=gen,
                                              dtype=torch.uint8)
        out[name + "_scales"] = torch.randint(119, 123, (experts, rows_out, rows_in // 32), generator=gen,
                                              dtype=torch.uint8)
    return out


def _bytes(size: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(size[:-2]) * units[size[-2:].upper()])


def write_sharded(state: dict[str, torch.Tensor], out: Path, max_shard_size: str) -> None:
    """state as safetensors shards of at most max_shard_size each (one bigger tensor gets its own), with the index
    transformers writes (model-0000N-of-0000M.safetensors, model.safetensors.index.json)."""
    limit, shards, current, size = _bytes(max_shard_size), [], {}, 0
    seen = set()
    for name, tensor in sorted(state.items()):
        if tensor.data_ptr() in seen and tensor.numel():  # a tied weight is stored once (lm_head = embeddings)
            continue
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().contiguous()
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write ARCH-LAYOUT/ checkpoints into")
    parser.add_argument("--arch", choices=list(LAYOUTS), action="append", help="default: every architecture")
    parser.add_argument("--layout", choices=[PER_EXPERT, FUSED, MXFP4], action="append", help="default: every layout")
    args = parser.parse_args()
    tok = tokenizer()
    for arch in args.arch or list(LAYOUTS):
        for layout in LAYOUTS[arch]:
            if args.layout and layout not in args.layout:
                continue
            name = arch if arch == "gemma2" else f"{arch}-{layout.replace('_', '-')}"
            folder = make_tiny_moe(args.out / name, arch, layout, tok=tok)
            files = len(list(folder.glob("*.safetensors")))
            print(f"{folder}: {arch}, {layout} layout, {files} shards")


if __name__ == "__main__":
    main()
