"""Our LoRA against two independent references: the formula on a dense fp32 copy, and PEFT itself."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_trainer import quant
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import (LoRALinear, apply_lora, delta_weight, lora_modules, lora_state_dict,
                                trainable_parameter_summary)
from tests.helpers import TINY, transformers_nf4


def _random_B(layer: LoRALinear, gen: torch.Generator) -> None:
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dense_base_matches_the_formula_outputs_and_gradients(use_rslora):
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(64, 48, bias=True)
    layer = LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora)
    _random_B(layer, gen)
    x = torch.randn(3, 5, 64, generator=gen, requires_grad=True)

    # Reference: independent leaf tensors, one dense matmul with W + scale * B @ A.
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ (W + scale * B @ A).T + b

    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(y.shape, generator=gen)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert base.weight.grad is None and base.bias.grad is None  # base frozen


def test_nf4_base_matches_dense_dequantized_reference():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=gen) * 0.05
    base = quant.new_nf4_linear(128, 96, bias=False, compute_dtype=torch.float32)
    quant.quantize_into(base, w, "cpu")
    layer = LoRALinear(base, r=8, alpha=16)
    _random_B(layer, gen)
    # The independent dense weight: bitsandbytes' own quantize/dequantize of the same tensor.
    import bitsandbytes.functional as F
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    W = F.dequantize_4bit(packed, state)
    x = torch.randn(4, 128, generator=gen)
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    y_ref = x @ (W + 2.0 * B @ A).T
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-4, atol=1e-5)


def test_init_is_peft_init():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    torch.manual_seed(3)
    nn.Linear(64, 32)  # the base consumed the same random numbers first
    expected = torch.empty(8, 64)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    assert torch.equal(layer.lora_A, expected)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: starts as the base model


def test_merge_then_unmerge_is_identity_and_merged_output_is_the_same():
    gen = torch.Generator().manual_seed(2)
    base = nn.Linear(64, 64)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=4)
    _random_B(layer, gen)
    x = torch.randn(5, 64, generator=gen)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, original + delta_weight(layer.lora_A, layer.lora_B, 1.0))
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_scaled_B_times_A():
    A, B = torch.randn(3, 10), torch.randn(7, 3)
    expected = torch.stack([torch.stack([sum(B[i, k] * A[k, j] for k in range(3)) for j in range(10)])
                            for i in range(7)]) * 0.5
    torch.testing.assert_close(delta_weight(A, B, 0.5), expected)


def _peft_model(path, r, alpha, use_rslora=False, targets="all-linear"):
    ref = transformers_nf4(path)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_rslora=use_rslora,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(ref, config)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_A_B_give_peft_logits_and_gradients(tiny_llama, use_rslora):
    peft_model = _peft_model(tiny_llama, r=8, alpha=16, use_rslora=use_rslora)
    ours = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    wrapped = apply_lora(ours, "all-linear", r=8, alpha=16, use_rslora=use_rslora)
    assert len(wrapped) == 7 * TINY["num_hidden_layers"]

    gen = torch.Generator().manual_seed(0)
    peft_state = {}
    for name, module in lora_modules(ours).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_B["default"].weight.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.05)
            module.lora_A.copy_(peft_layer.lora_A["default"].weight)
            module.lora_B.copy_(peft_layer.lora_B["default"].weight)
        peft_state[name] = peft_layer

    ids = torch.randint(0, TINY["vocab_size"], (2, 20), generator=gen)
    ours.train()
    peft_model.train()
    ours_logits = ours(ids).logits
    peft_logits = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, peft_logits, rtol=1e-5, atol=1e-5)
    ours_logits.logsumexp(-1).mean().backward()
    peft_logits.logsumexp(-1).mean().backward()
    for name, module in lora_modules(ours).items():
        torch.testing.assert_close(module.lora_A.grad, peft_state[name].lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(module.lora_B.grad, peft_state[name].lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["gate_proj", "down_proj", "o_proj"]])
def test_trainable_parameter_counts_match_peft(tiny_llama, targets):
    peft_model = _peft_model(tiny_llama, r=4, alpha=8, targets=targets)
    ours = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    apply_lora(ours, targets, r=4, alpha=8)
    trainable, total, line = trainable_parameter_summary(ours)
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    assert line.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")
    assert set(name for name, p in ours.named_parameters() if p.requires_grad) == set(lora_state_dict(ours))


def test_lm_head_is_never_wrapped_and_unknown_targets_are_named(tiny_llama):
    ours = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    apply_lora(ours, "all-linear", r=2, alpha=2)
    assert not isinstance(ours.lm_head, LoRALinear)
    fresh = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    with pytest.raises(UserError, match=r"lora\.targets: qproj match no linear layer.*q_proj"):
        apply_lora(fresh, ["qproj"], r=2, alpha=2)
