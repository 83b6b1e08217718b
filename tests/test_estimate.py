"""estimate.py: every line of the breakdown against numbers worked out by hand from the formulas, the NF4
bytes against real bitsandbytes, LoRA counts against a real model built on the meta device, and the
search functions against the estimate itself."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.errors import UserError
from qlora_trainer.estimate import (
    GIB,
    RunSettings,
    estimate_memory,
    max_batch_that_fits,
    max_seq_len_that_fits,
    nf4_bytes,
    read_config_json,
    shape_from_config,
)

LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
}
TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False,
}


def nf4_by_hand(numel: int) -> int:
    """packed 4-bit + uint8 absmax per 64 + fp32 absmax per 256 blocks + 16 + 256 fp32 code tables + offset."""
    blocks = math.ceil(numel / 64)
    return numel // 2 + blocks + 4 * math.ceil(blocks / 256) + (16 * 4 + 256 * 4 + 4)


def check_breakdown(b, expected: dict) -> None:
    for name, value in expected.items():
        assert getattr(b, name) == value, name
    activations = max(expected["layer_recompute"], expected["loss_chunk"])
    allocated = sum(expected[k] for k in ("quantized_weights", "dense_weights", "lora_params", "lora_grads",
                                          "optimizer_state", "checkpointed_inputs")) + activations
    assert b.allocated == allocated
    assert b.cuda_overhead == int(0.5 * GIB) + int(0.05 * allocated)
    assert b.total == allocated + b.cuda_overhead


def test_llama3_8b_by_hand():
    run = RunSettings(seq_len=2048, batch_size=1, rank=16)  # all linear, paged_adamw_8bit, bf16, dropout 0.05
    h, i, L, V, q, kv, hd, heads, N, r = 4096, 14336, 32, 128256, 4096, 1024, 128, 32, 2048, 16

    quantized = L * (2 * nf4_by_hand(4096 * 4096) + 2 * nf4_by_hand(1024 * 4096) + 3 * nf4_by_hand(14336 * 4096))
    assert L * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) == 6_979_321_856  # linear params
    dense = 2 * (2 * V * h + (2 * L + 1) * h)  # bf16 embed_tokens + lm_head + 65 norms
    # LoRA r*(in+out): q, o (4096+4096), k, v (4096+1024), gate, up, down (4096+14336)
    lora_count = L * r * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert lora_count == 41_943_040
    # every LoRA tensor has >= 4096 elements and a multiple of 256: uint8 x 2 moments + fp32 absmax per 256
    optimizer = 2 * lora_count + 2 * 4 * lora_count // 256
    checkpointed = N * (L * 2 * h + 2 * 2 * hd)
    saved_per_token = (
        2 * (4 * h + 4 * h)  # two RMSNorms: fp32 copy + normed bf16 + output
        + 2 * (q + 2 * kv) + 4 * (q + kv)  # q/k/v outputs; RoPE rotate_half copies + rotated q, k
        + 2 * q + 4 * heads + 2 * q  # SDPA output + logsumexp, o_proj's input
        + 8 * i  # gate, up, silu, product
        + 3 * (3 * h + q + 2 * h + i)  # dropout copy (bf16) + mask (bool) of each targeted linear's input
        + 2 * r * 7  # x @ A.T per target
    )
    backward_per_token = 4 * h + 6 * i
    layer = N * (saved_per_token + backward_per_token) + 2 * 14336 * 4096  # + dequantized gate_proj
    loss = N * (4 * h + 4 * h + 2 * h) + 1024 * V * 12
    b = estimate_memory(LLAMA3_8B, run)
    check_breakdown(b, dict(
        quantized_weights=quantized, dense_weights=dense, lora_params=4 * lora_count, lora_grads=4 * lora_count,
        optimizer_state=optimizer, checkpointed_inputs=checkpointed, layer_recompute=layer, loss_chunk=loss,
        lora_param_count=lora_count,
    ))
    assert 8 * GIB < b.total < 9.5 * GIB


def test_tiny_by_hand():
    # loss chunk (1024) larger than the batch's 128 tokens; fp32 AdamW; no dropout; q and v only
    run = RunSettings(seq_len=64, batch_size=2, rank=8, targets="q_proj,v_proj", optimizer="adamw",
                      lora_dropout=0.0)
    h, i, L, V, q, kv, hd, heads, N, r = 128, 384, 4, 1000, 128, 64, 32, 4, 128, 8

    quantized = L * (2 * nf4_by_hand(128 * 128) + 2 * nf4_by_hand(64 * 128) + 3 * nf4_by_hand(384 * 128))
    dense = 2 * (2 * V * h + 9 * h)
    lora_count = L * r * ((128 + 128) + (128 + 64))
    checkpointed = N * (L * 2 * h + 2 * 2 * hd)
    saved_per_token = (2 * (4 * h + 4 * h) + 2 * (q + 2 * kv) + 4 * (q + kv) + 2 * q + 4 * heads + 2 * q
                       + 8 * i + 2 * r * 2)
    layer = N * (saved_per_token + 4 * h + 6 * i) + 2 * 384 * 128
    loss = N * 10 * h + N * V * 12
    check_breakdown(estimate_memory(TINY, run), dict(
        quantized_weights=quantized, dense_weights=dense, lora_params=4 * lora_count, lora_grads=4 * lora_count,
        optimizer_state=8 * lora_count, checkpointed_inputs=checkpointed, layer_recompute=layer,
        loss_chunk=loss, lora_param_count=lora_count,
    ))


def test_tiny_8bit_optimizer_keeps_small_tensors_fp32():
    run = RunSettings(seq_len=64, rank=16, optimizer="paged_adamw_8bit")
    # per layer, 8-bit (>= 4096 elements): down A (16 x 384), gate B and up B (384 x 16); the rest fp32
    eight_bit = [16 * 384] * 3
    fp32 = [16 * 128] * 6 + [128 * 16, 64 * 16, 64 * 16, 128 * 16, 128 * 16]  # six A's; q, k, v, o, down B
    per_layer = 8 * sum(fp32) + sum(2 * (n + 4 * math.ceil(n / 256)) for n in eight_bit)
    assert estimate_memory(TINY, run).optimizer_state == 4 * per_layer


def test_tied_embeddings_count_once():
    run = RunSettings(seq_len=16)
    untied = estimate_memory(TINY, run).dense_weights
    tied = estimate_memory({**TINY, "tie_word_embeddings": True}, run).dense_weights
    assert untied - tied == 2 * 1000 * 128


def test_nf4_bytes_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(128, 384, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    tensors = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert real == nf4_bytes(128 * 384) == nf4_by_hand(128 * 384) == 26448


def test_lora_count_matches_real_model_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in TINY.items() if k != "model_type"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    r = 16
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert len(linears) == 7 * 4
    real = sum(r * (m.in_features + m.out_features) for m in linears)
    assert estimate_memory(TINY, RunSettings(seq_len=8, rank=r)).lora_param_count == real
    # and the NF4 bytes of the same modules
    real_nf4 = sum(nf4_bytes(m.weight.numel()) for m in linears)
    assert estimate_memory(TINY, RunSettings(seq_len=8)).quantized_weights == real_nf4


@pytest.mark.parametrize("field", ["seq_len", "batch_size", "rank"])
def test_more_means_more_memory(field):
    base = RunSettings(seq_len=512, batch_size=2, rank=8)
    totals = [estimate_memory(LLAMA3_8B, RunSettings(**{**base.__dict__, field: v})).total for v in (4, 8, 16, 1024)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


@pytest.mark.parametrize("config", [LLAMA3_8B, TINY], ids=["llama3-8b", "tiny"])
def test_max_seq_len_is_the_boundary(config):
    run = RunSettings(batch_size=1)
    gpu_gib = 24.0 if config is LLAMA3_8B else 0.75
    t = max_seq_len_that_fits(gpu_gib, config, run)
    assert t > 0
    assert estimate_memory(config, RunSettings(seq_len=t)).total <= gpu_gib * GIB
    assert estimate_memory(config, RunSettings(seq_len=t + 1)).total > gpu_gib * GIB
    b = max_batch_that_fits(gpu_gib, config, RunSettings(seq_len=1024))
    assert estimate_memory(config, RunSettings(seq_len=1024, batch_size=b)).total <= gpu_gib * GIB
    assert estimate_memory(config, RunSettings(seq_len=1024, batch_size=b + 1)).total > gpu_gib * GIB


def test_nothing_fits_gives_zero():
    assert max_seq_len_that_fits(1.0, LLAMA3_8B) == 0
    assert max_batch_that_fits(1.0, LLAMA3_8B) == 0


# ----------------------------------------------------------------------------------------- input / CLI


def test_cli_prints_table_and_fits(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "4096", "--rank", "16"]) == 0  # DESIGN's flags
    out = capsys.readouterr().out
    assert "total (peak)" in out and "optimizer state (paged_adamw_8bit)" in out
    run = RunSettings(seq_len=4096, rank=16)
    assert f"seq len up to {max_seq_len_that_fits(80, LLAMA3_8B, run):,}" in out
    assert f"{estimate_memory(LLAMA3_8B, run).total / GIB:6.2f}" in out


def test_model_from_config_json_path_and_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert read_config_json(tmp_path / "config.json")[0] == TINY
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_config_json("org/tiny")[0] == TINY


@pytest.mark.parametrize("argv, names", [
    (["--model", "/models/llama3-70b"], "/models/llama3-70b"),
    (["--model", "MODEL", "--seq-len", "0"], "--seq-len"),
    (["--model", "MODEL", "--batch-size", "-1"], "--batch-size"),
    (["--model", "MODEL", "--rank", "0"], "--rank"),
    (["--model", "MODEL", "--gpu-gib", "0"], "--gpu-gib"),
    (["--model", "MODEL", "--targets", "qkv"], "--targets"),
    (["--model", "EMPTY"], "no config.json"),
    (["--model", "EMPTY/bad.json"], "bad.json"),
])
def test_bad_input_names_the_flag_or_file(tmp_path, capsys, argv, names):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.json").write_text("{not json")
    argv = [a.replace("MODEL", str(tmp_path / "m")).replace("EMPTY", str(tmp_path / "empty")) for a in argv]
    assert main(["estimate", *argv]) == 2
    assert re.search(names, capsys.readouterr().err)


@pytest.mark.parametrize("change, names", [
    ({"model_type": "gpt_bigcode"}, "model_type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_bad_config_names_the_key(change, names):
    with pytest.raises(UserError, match=names):
        shape_from_config({**TINY, **change}, "some/config.json")


def test_head_dim_and_kv_heads_defaults():
    shape = shape_from_config({k: v for k, v in TINY.items() if k != "num_key_value_heads"})
    assert (shape.head_dim, shape.kv_heads) == (32, 4)
    assert shape_from_config({**TINY, "head_dim": 64}).q_dim == 256
