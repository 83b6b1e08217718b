"""Merging LoRA on expert weights: the pure delta against PEFT's merge_and_unload, and merge's folder for a fused MoE
checkpoint against our quantized base + adapter, loaded by plain transformers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_trainer.adapter import save_adapter
from qlora_trainer.errors import UserError
from qlora_trainer.lora import apply_lora
from qlora_trainer.expert_lora import expert_update
from qlora_trainer.merge import merge
from tests.helpers import load_ours, logits_of, random_ids, random_lora_b
from tests.moe_helpers import ARCHS, VOCAB, moe_config, write_fused_moe

warnings.filterwarnings("ignore", message=".*RoPE.*")


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_merged_expert_weight_is_peft_merge_and_unload(arch):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(moe_config(arch)).float()
    original = copy.deepcopy(base)
    config = LoraConfig(r=3, lora_alpha=7, target_modules=[], lora_dropout=0.0,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    factors = {}
    for name, param in peft_model.base_model.model.named_parameters():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            factors[module] = (param.detach().clone(), None)
        elif ".lora_B." in name:
            module = name.split(".lora_B.")[0]
            factors[module] = (factors[module][0], param.detach().clone())
    merged = peft_model.merge_and_unload()
    for layer in range(2):
        experts = original.model.layers[layer].mlp.experts
        prefix = f"model.layers.{layer}.mlp.experts"
        pairs = {"gate_up_proj": factors[prefix + ".base_layer"], "down_proj": factors[prefix]}  # PEFT's nesting
        for attr, (A, B) in pairs.items():
            weight = getattr(experts, attr).detach()
            update = expert_update(A, B, 7 / 3, num_experts=weight.shape[0], transposed=experts.is_transposed)
            ours = torch.stack([weight[e] + update(e) for e in range(weight.shape[0])])
            expected = getattr(merged.model.layers[layer].mlp.experts, attr).detach()
            torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_fused_moe_loads_in_transformers_with_our_logits(tmp_path, arch):
    base = write_fused_moe(tmp_path / "base", arch)
    model = load_ours(base)
    apply_lora(model, "all-linear", r=2, alpha=4)
    random_lora_b(model, std=0.3)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    out = merge(base, adapter, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = random_ids(VOCAB, length=20)
    ours = logits_of(model.eval(), x)
    assert (ours - logits_of(load_ours(base), x)).abs().max() > 1e-2
    torch.testing.assert_close(logits_of(merged, x), ours, rtol=1e-4, atol=1e-4)


@pytest.fixture
def down_proj_adapter(tmp_path):
    """An adapter on the down_proj experts of a fused tiny Qwen3-MoE, without our record (as PEFT's: no fingerprint
    catches a wrong base before merge's own checks)."""
    base = write_fused_moe(tmp_path / "base", "qwen3_moe")
    model = load_ours(base)
    apply_lora(model, ["down_proj"], r=2, alpha=4)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    (adapter / "qlora_trainer.json").unlink()
    return adapter


def test_merge_names_expert_factors_that_do_not_fit(tmp_path, down_proj_adapter):
    other = write_fused_moe(tmp_path / "other", "qwen3_moe", experts=8)
    with pytest.raises(UserError, match=r"LoRA shapes for 'model\.layers\.0\.mlp\.experts\.down_proj' "
                                        r"\(A \(8, 64\), B \(64, 8\)\) do not fit the base weight"):
        merge(other, down_proj_adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
