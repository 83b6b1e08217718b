"""Adapters with LoRA on expert weights, in PEFT's target_parameters layout: ours loads in PEFT over transformers' NF4
load of the same fused MoE checkpoint with our logits, PEFT's loads in ours with PEFT's logits, validation names
wrong expert factors, and a checkpoint restores them."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_trainer.adapter import copy_weights_into, load_adapter_into, read_adapter, save_adapter, validate
from qlora_trainer.errors import UserError
from qlora_trainer.expert_lora import expert_lora_modules
from qlora_trainer.lora import apply_lora
from qlora_trainer.names import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from tests.helpers import load_ours, logits_of, random_ids, random_lora_b
from tests.moe_helpers import ARCHS, VOCAB, moe_config, transformers_nf4_with_our_experts, write_fused_moe

warnings.filterwarnings("ignore", message=".*RoPE.*")
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """{arch: a fused tiny MoE checkpoint in fp32}."""
    return {arch: write_fused_moe(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def ours_saved(fused, tmp_path_factory):
    """{arch: (our model with all-linear LoRA and random B, its saved adapter folder)}."""
    saved = {}
    for arch, path in fused.items():
        model = load_ours(path)
        apply_lora(model, "all-linear", r=2, alpha=4, dropout=0.05)
        random_lora_b(model, std=0.3)
        saved[arch] = (model, save_adapter(model, tmp_path_factory.mktemp(f"{arch}-adapter") / "adapter",
                                           base_model_name_or_path=str(path)))
    return saved


@pytest.mark.parametrize("arch", ARCHS)
def test_our_adapter_is_written_in_peft_layout(ours_saved, arch):
    model, folder = ours_saved[arch]
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["lora_dropout"] == 0.0  # PEFT refuses any other with target_parameters
    tensors = safetensors.torch.load_file(folder / ADAPTER_WEIGHTS_FILE)
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    key = PREFIX + "model.layers.1.mlp.experts"
    assert torch.equal(tensors[f"{key}.base_layer.lora_A.weight"], gate_up.lora_A)  # the inner wrapper
    assert torch.equal(tensors[f"{key}.lora_B.weight"], down.lora_B)  # the outer one
    assert tensors[f"{key}.base_layer.lora_A.weight"].shape == (2 * 4, gate_up.in_features)
    assert tensors[f"{key}.lora_B.weight"].shape == (down.out_features, 2 * 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_our_adapter_with_our_logits(fused, ours_saved, arch):
    model, folder = ours_saved[arch]
    reference = PeftModel.from_pretrained(transformers_nf4_with_our_experts(fused[arch]), folder).eval()
    x = random_ids(VOCAB, length=20)
    ours = logits_of(model.eval(), x)
    assert (ours - logits_of(load_ours(fused[arch]), x)).abs().max() > 1e-2
    torch.testing.assert_close(logits_of(reference, x), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_peft_adapter_loads_in_ours_with_peft_logits(fused, tmp_path, arch):
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(transformers_nf4_with_our_experts(fused[arch]), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    x = random_ids(VOCAB, length=20, seed=2)
    expected = logits_of(peft_model.eval(), x)

    model = load_ours(fused[arch])
    adapter = load_adapter_into(model, tmp_path / "peft")
    assert len(adapter.experts) == 4 and len(adapter.weights) == 4
    assert set(expert_lora_modules(model)) == set(adapter.experts)
    torch.testing.assert_close(logits_of(model.eval(), x), expected, rtol=1e-4, atol=1e-4)


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "adapter")


def _edit(folder, edit):
    tensors = safetensors.torch.load_file(folder / ADAPTER_WEIGHTS_FILE)
    edit(tensors)
    safetensors.torch.save_file(tensors, folder / ADAPTER_WEIGHTS_FILE)
    (folder / "qlora_trainer.json").unlink()  # as a PEFT adapter: no checksum, no fingerprint


KEY0 = PREFIX + "model.layers.0.mlp.experts"


def test_wrong_expert_factors_are_named(fused, ours_saved, tmp_path):
    folder = _copy(ours_saved["mixtral"][1], tmp_path)
    _edit(folder, lambda t: t.update({f"{KEY0}.lora_A.weight": torch.zeros(2 * 5, 128)}))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.experts has lora_A \(10, 128\) and lora_B \(64, 8\)"):
        read_adapter(folder)
    folder = _copy(ours_saved["mixtral"][1], tmp_path / "b")
    _edit(folder, lambda t: [t.update({k: torch.zeros(t[k].shape[0] * 3 // 2, t[k].shape[1]) if "lora_A" in k
                                       else torch.zeros(t[k].shape[0], t[k].shape[1] * 3 // 2)})
                             for k in list(t) if k.startswith(KEY0 + ".lora_")])
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.experts\.down_proj has lora_A \(12, 128\).*"
                                        r"4 experts of \(out=64, in=128\)"):
        validate(load_ours(fused["mixtral"]), folder)


def test_missing_expert_factors_are_named(ours_saved, tmp_path):
    folder = _copy(ours_saved["qwen3_moe"][1], tmp_path)
    _edit(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith(KEY0 + ".base_layer.")])
    with pytest.raises(UserError, match=r"experts has LoRA weights nested 1 deep, but target_parameters .* names 2"):
        read_adapter(folder)


def test_fingerprint_covers_expert_shapes(ours_saved):
    """num_local_experts is no fingerprint field: the expert weights' shapes tell the bases apart."""
    config = moe_config("mixtral")
    config.num_local_experts = 8
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match=r"different base model.*experts\.down_proj is \(4, 64, 128\) "
                                        r"\(experts, out, in\) in the adapter's base vs \(8, 64, 128\) here"):
        validate(other, ours_saved["mixtral"][1])


def test_a_checkpoint_restores_expert_factors(fused, ours_saved):
    model, folder = ours_saved["gpt_oss"]
    fresh = load_ours(fused["gpt_oss"])
    apply_lora(fresh, "all-linear", r=2, alpha=4)
    copy_weights_into(fresh, read_adapter(folder))
    for path, layer in expert_lora_modules(model).items():
        restored = fresh.get_submodule(path)
        assert torch.equal(restored.lora_A, layer.lora_A) and torch.equal(restored.lora_B, layer.lora_B)
    x = random_ids(VOCAB)
    torch.testing.assert_close(logits_of(fresh.eval(), x), logits_of(model.eval(), x))


def test_partly_targeted_expert_weights_round_trip_through_peft(fused, tmp_path):
    """gate_up_proj in layer 1 only: target_parameters names its full path, and PEFT nests only there."""
    model = load_ours(fused["gpt_oss"])
    apply_lora(model, ["layers.1.mlp.experts.gate_up_proj", "down_proj"], r=2, alpha=4)
    random_lora_b(model, std=0.3, seed=3)
    folder = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(fused["gpt_oss"]))
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["target_parameters"] == ["experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert config["target_modules"] == []
    keys = set(safetensors.torch.load_file(folder / ADAPTER_WEIGHTS_FILE))
    assert f"{KEY0}.lora_A.weight" in keys and f"{KEY0}.base_layer.lora_A.weight" not in keys
    reference = PeftModel.from_pretrained(transformers_nf4_with_our_experts(fused["gpt_oss"]), folder).eval()
    x = random_ids(VOCAB, length=20, seed=4)
    torch.testing.assert_close(logits_of(reference, x), logits_of(model.eval(), x), rtol=1e-4, atol=1e-4)
    assert set(read_adapter(folder).experts) == set(expert_lora_modules(model))
