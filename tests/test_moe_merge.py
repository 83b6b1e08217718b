"""merge of mixture-of-experts checkpoints: the experts go back in the checkpoint's own layout (per-expert names for a
per-expert checkpoint, the fused 3-D tensors for a fused one), for both --into targets, and plain transformers
loads the merged folder with our logits (an adapter on attention; LoRA on the experts is tested with it)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_trainer.adapter import load_adapter_into, save_adapter
from qlora_trainer.expert_layout import looks_per_expert
from qlora_trainer.expert_lora import expert_lora_modules
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora
from qlora_trainer.merge import merge
from qlora_trainer.verify import verify
from tests.helpers import logits_of, random_ids, random_lora_b, write_peft_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases(tiny_moe):
    return {"mixtral": tiny_moe["mixtral", "per_expert"], "qwen2": tiny_moe["qwen2_moe", "per_expert"],
            "gpt_oss": tiny_moe["gpt_oss", "fused"], "qwen3_fused": tiny_moe["qwen3_moe", "fused"]}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """PEFT's own LoRA on attention over each base (random non-zero B)."""
    root = tmp_path_factory.mktemp("moe-adapters")
    return {name: write_peft_adapter(base, root / name, targets=ATTENTION, b_std=0.2) for name, base in bases.items()}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("name", ["mixtral", "qwen2", "gpt_oss", "qwen3_fused"])
def test_dequantized_merge_keeps_the_layout_and_gives_our_logits(bases, adapters, name, tmp_path):
    base, adapter = bases[name], adapters[name]
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", compute_dtype="fp32", max_shard_size="300KB",
                progress=False)
    source, merged = _tensors(base), _tensors(out)
    assert set(merged) == set(source)  # the checkpoint's own names: per expert stays per expert, fused stays fused
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(source) and len(set(index.values())) > 1
    for key, tensor in source.items():
        assert merged[key].shape == tensor.shape, key
    ours = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    load_adapter_into(ours, adapter)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # transformers' default experts
    ids = random_ids(ours.config.vocab_size, length=16)
    a, b = logits_of(ours, ids), logits_of(plain, ids)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # the adapter matters: the merged model is not the base
    base_only = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    assert (logits_of(base_only, ids) - b).abs().max() > 1e-2


def test_original_merge_writes_each_expert_back_unchanged(bases, adapters, tmp_path):
    """--into original on a per-expert checkpoint: every expert tensor is the checkpoint's own, bit for bit (fused by
    transformers' operations and split back by their inverse); the attention weights carry W + scale B A."""
    base, adapter = bases["mixtral"], adapters["mixtral"]
    out = merge(base, adapter, tmp_path / "orig", into="original", progress=False)
    source, merged = _tensors(base), _tensors(out)
    experts = [k for k in source if looks_per_expert(k)]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    for key in experts:
        assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], source[key]), key
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(adapter / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    a = lora["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].float()
    b = lora["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].float()
    expected = (source[key].float() + config["lora_alpha"] / config["r"] * b @ a).to(torch.bfloat16)
    assert torch.equal(merged[key], expected)


def test_dequantized_merge_rounds_each_expert_as_loading_does(bases, adapters, tmp_path):
    """Without an update on the experts, a dequantized merge writes each expert as NF4 gives it back: our loaded
    model's expert e, split into the checkpoint's w1/w3 halves by hand (Mixtral: gate_up = [w1; w3])."""
    base, adapter = bases["mixtral"], adapters["mixtral"]
    out = merge(base, adapter, tmp_path / "deq", dtype="fp32", compute_dtype="fp32", progress=False)
    merged = _tensors(out)
    ours = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    gate_up = ours.get_submodule("model.layers.1.mlp.experts.gate_up_proj")[3]
    down = ours.get_submodule("model.layers.1.mlp.experts.down_proj")[3]
    half = gate_up.shape[0] // 2
    prefix = "model.layers.1.block_sparse_moe.experts.3"
    assert torch.equal(merged[f"{prefix}.w1.weight"], gate_up[:half])
    assert torch.equal(merged[f"{prefix}.w3.weight"], gate_up[half:])
    assert torch.equal(merged[f"{prefix}.w2.weight"], down)


def test_verify_passes_on_a_moe_merge(bases, adapters, tmp_path):
    out = merge(bases["qwen2"], adapters["qwen2"], tmp_path / "m", dtype="fp32", compute_dtype="fp32",
                progress=False)
    report = verify(bases["qwen2"], adapters["qwen2"], out, device="cpu")
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-3


def test_a_base_stored_in_mxfp4_merges_into_full_precision_experts(tiny_moe, adapters, tmp_path):
    """gpt-oss as published (MXFP4 experts): the merged folder holds the experts as transformers' dequantized load
    does (the fused bf16 parameters, no quantization_config), and plain transformers gives our logits."""
    base = tiny_moe["gpt_oss", "mxfp4"]
    adapter = adapters["gpt_oss"]  # attention LoRA of the same architecture
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", compute_dtype="fp32", progress=False)
    merged = _tensors(out)
    assert not any(k.endswith("_blocks") or k.endswith("_scales") for k in merged)
    assert merged["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 128, 256)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ours = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    load_adapter_into(ours, adapter)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(ours.config.vocab_size, length=16)
    torch.testing.assert_close(logits_of(plain, ids), logits_of(ours, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "qwen2"])
def test_expert_lora_merges_into_a_per_expert_checkpoint(bases, name, tmp_path):
    """LoRA on every expert weight (all-linear) over a per-expert checkpoint: each expert's update lands in its own
    per-expert tensors, and plain transformers' load of the merged folder gives the logits of our NF4 model + adapter."""
    base = bases[name]
    ours = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    apply_lora(ours, "all-linear", r=2, alpha=4)
    assert expert_lora_modules(ours)
    random_lora_b(ours, std=0.3)
    adapter = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", compute_dtype="fp32", progress=False)
    source, merged = _tensors(base), _tensors(out)
    assert set(merged) == set(source) and any(looks_per_expert(key) for key in merged)
    ids = random_ids(ours.config.vocab_size, length=16)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = logits_of(ours.eval(), ids)
    torch.testing.assert_close(logits_of(plain, ids), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the experts' updates matter: without them our logits move
        for layer in expert_lora_modules(ours).values():
            layer.lora_B.zero_()
    assert (logits_of(ours, ids) - expected).abs().max() > 1e-3
