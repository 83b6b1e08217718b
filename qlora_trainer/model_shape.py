"""The numbers of a model's config.json that its memory depends on (ModelShape), read without torch or transformers,
and the bytes of one NF4 tensor: what `estimate` computes with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from qlora_trainer.errors import UserError
from qlora_trainer.names import NF4_BLOCKSIZE

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")

# bitsandbytes NF4 with double quantization (quantize_4bit(blocksize=64, compress_statistics=True)):
# NF4_BLOCKSIZE (names.py): one uint8 quantized absmax per 64 weights
NF4_NESTED_BLOCKSIZE = 256  # one fp32 absmax per 256 first-level absmax values
# Per quantized tensor: the NF4 code (16 fp32) + the nested dynamic code (256 fp32) + the fp32 offset.
NF4_TABLE_BYTES = 16 * 4 + 256 * 4 + 4


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight after bnb quantize_4bit(nf4, blocksize 64, compress_statistics=True):
    packed 4-bit weights + uint8 absmax per 64 + fp32 absmax per 256 absmax + code tables and offset."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + NF4_TABLE_BYTES


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a config.json that memory depends on."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int | None = None
    # mixture of experts (experts == 0: a dense model): routed experts per layer, how many each token goes to, each
    # expert's intermediate size, a shared expert's (Qwen2-MoE: a dense MLP beside them), expert biases (gpt-oss)
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    expert_bias: bool = False

    @property
    def mlp_width(self) -> int:
        """Intermediate activations per token of one layer's MLP: the dense MLP's, or the routed experts' of a
        token plus the shared expert's."""
        if not self.experts:
            return self.intermediate
        return self.experts_per_token * self.expert_intermediate + self.shared_intermediate

    def expert_weight_bytes(self) -> int:
        """One MoE layer's experts in NF4 as experts.NF4ExpertWeights stores them: gate_up and down, each expert
        quantized on its own (codes, absmax, second-level absmax, offset), the two code tables once per tensor."""
        if not self.experts:
            return 0
        tables = NF4_TABLE_BYTES - 4  # the two code tables, once per tensor; the fp32 offset is per expert

        def tensor(numel_per_expert: int) -> int:
            return self.experts * (nf4_bytes(numel_per_expert) - tables) + tables

        per_expert = self.expert_intermediate * self.hidden
        return tensor(2 * per_expert) + tensor(per_expert)

    def router_params(self) -> int:
        """Full-precision numbers per MoE layer: the router (and its bias), expert biases (gpt-oss)."""
        if not self.experts:
            return 0
        biases = self.experts * (1 + 2 * self.expert_intermediate + self.hidden) if self.expert_bias else 0
        return self.experts * self.hidden + biases

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each nn.Linear in one decoder layer (a MoE layer: attention and the shared expert's MLP;
        its experts are 3-D tensors, expert_weight_bytes)."""
        h = self.hidden
        i = self.shared_intermediate if self.experts else self.intermediate
        mlp = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)} if i else {}
        return {
            "q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim), **mlp,
        }



def shape_from_config(config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
    """The ModelShape of a LLaMA-family config.json dict; `source` names the file in errors."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{source}: model_type {model_type!r} is not supported by estimate; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    def positive_int(key: str, default: int | None = None) -> int:
        value = config.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{source}: {key} must be a positive integer, got {config.get(key)!r}")
        return value

    hidden, heads = positive_int("hidden_size"), positive_int("num_attention_heads")
    # MoE keys as transformers' configs spell them (num_local_experts: Mixtral, gpt-oss; num_experts: Qwen-MoE)
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    moe = dict(experts=experts, experts_per_token=positive_int("num_experts_per_tok"),
               expert_intermediate=positive_int("moe_intermediate_size", config.get("intermediate_size")),
               shared_intermediate=config.get("shared_expert_intermediate_size") or 0,
               expert_bias=model_type == "gpt_oss") if experts else {}
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        intermediate=positive_int("intermediate_size"),
        layers=positive_int("num_hidden_layers"),
        heads=heads,
        kv_heads=positive_int("num_key_value_heads", heads),  # absent: plain multi-head attention
        head_dim=positive_int("head_dim", hidden // heads),
        vocab=positive_int("vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_positions=config.get("max_position_embeddings"),
        **moe,
    )
