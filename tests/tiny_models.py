"""Small LLaMA checkpoints written on the fly for tests, and the reference loads we compare against."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from qlora_trainer import quant

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def write_tiny_llama(out: Path, *, tied: bool = False, shard_size: str | None = "150KB",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """A random tiny LLaMA saved with save_pretrained (sharded unless shard_size is None)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(out, **kwargs)
    return out


def transformers_nf4(path: Path, compute_dtype: torch.dtype = torch.float32):
    """The ecosystem's reference: transformers + bitsandbytes NF4 with double quantization."""
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, dtype=compute_dtype,
                                                 device_map="cpu")
    for module in model.modules():
        if quant.is_nf4_linear(module):
            module.support_avx512bf16_for_cpu = False  # the same exact NF4 path ours takes on CPU
    return model.eval()
