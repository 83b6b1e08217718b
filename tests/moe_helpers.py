"""Tiny random mixture-of-experts checkpoints for the expert-LoRA tests, written in the fused layout (one 3-D tensor per
expert projection, the names of transformers 5's parameters), and a stand-in expert weight store.

transformers 5's save_pretrained writes Mixtral and Qwen3-MoE per expert (its weight conversion run backwards) and
gpt-oss fused, so the fused files are written here with safetensors from the model's own state dict.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes.functional as bnbf
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from qlora_trainer import quant
from tests.helpers import make_tokenizer

ARCHS = ("mixtral", "qwen3_moe", "gpt_oss")
VOCAB = 128
_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
               num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)


def moe_config(arch: str, experts: int = 4):
    """A tiny config of `arch`: 2 layers, 4 experts (2 per token), hidden 64 (a whole NF4 block per row)."""
    if arch == "mixtral":
        return MixtralConfig(**_COMMON, intermediate_size=128, num_local_experts=experts)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
                              head_dim=16, norm_topk_prob=True)
    if arch == "gpt_oss":
        return GptOssConfig(**_COMMON, intermediate_size=64, num_local_experts=experts, head_dim=16,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(arch)


def write_fused_moe(out: Path, arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    experts: int = 4) -> Path:
    """A random tiny `arch` model saved fused (config.json, model.safetensors, a word-level tokenizer)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(arch, experts)).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def fused_checkpoint(tmp_path_factory, arch: str) -> Path:
    return write_fused_moe(tmp_path_factory.mktemp(f"moe-{arch}"), arch)


class NF4ExpertsStandIn(nn.Module):
    """A stand-in for the loader's NF4 expert store (the shared contract: .shape, .dtype, [e] -> expert e's dense
    weight in the stored orientation, dequantized alone): each expert quantized on its own through quant.py."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shape, self.dtype, self.num_experts = weight.shape, dtype, weight.shape[0]
        self.experts = [quant.quantize_nf4(weight[e].contiguous(), dtype) for e in range(weight.shape[0])]
        self.register_buffer("reads", torch.zeros(weight.shape[0], dtype=torch.long), persistent=False)

    def __getitem__(self, e):
        self.reads[e] += 1  # which experts were dequantized (tests check that unrouted ones are not)
        return bnbf.dequantize_4bit(*self.experts[int(e)]).to(self.dtype)


def our_experts_into(reference, ours) -> None:
    """Copy each of our NF4 expert weights, dequantized, into the same 3-D parameter of a transformers model (which
    keeps its experts in full precision): the reference then computes with our experts, through its own code."""
    from qlora_trainer.experts import is_nf4_experts
    with torch.no_grad():
        for name, module in ours.named_modules():
            if is_nf4_experts(module):
                param = reference.get_parameter(name)
                for e in range(module.num_experts):
                    param[e].copy_(module[e])


def transformers_nf4_with_our_experts(path: Path):
    """transformers + bitsandbytes NF4 (the reference), with our NF4 experts in place of its full-precision ones."""
    from tests.helpers import load_ours, transformers_nf4
    reference = transformers_nf4(path)
    our_experts_into(reference, load_ours(path))
    return reference
