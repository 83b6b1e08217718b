"""LoRA on expert weights (qlora_trainer/expert_lora.py): PEFT's layout and numbers (PEFT's own ParamWrapper as the
reference), the expert store contract with a plain Parameter and an NF4 stand-in, gradients against a dense fp32
computation written by hand, targets, the eager experts forward, and training."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_trainer.errors import UserError
from qlora_trainer.expert_lora import ExpertLoRA, expert_delta, expert_lora_modules, expert_parameters
from qlora_trainer.lora import apply_lora, lora_modules, lora_state_dict, resolve_targets
from tests.helpers import logits_of, random_ids
from tests.moe_helpers import ARCHS, VOCAB, NF4ExpertsStandIn, moe_config

warnings.filterwarnings("ignore", message=".*RoPE.*")


def _tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(arch)).float().eval()


def _peft(model, *, r=2, alpha=4, target_modules=(), use_rslora=False, seed=1):
    """PEFT's LoRA on both expert projections (and target_modules), with random non-zero A and B."""
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"], use_rslora=use_rslora)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return peft_model.eval()


def _peft_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter path: (A, B)} of PEFT's ParamWrappers (found by their parameter_name, not by tensor names)."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            path = name.replace(".base_layer", "") + "." + module.parameter_name
            found[path] = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
    return found


# ------------------------------------------------------------------------------------------ PEFT's numbers

@pytest.mark.parametrize("arch", ARCHS)
def test_delta_is_peft_get_delta_weight(arch):
    from peft.tuners.lora.layer import ParamWrapper

    peft_model = _peft(_tiny(arch), r=3, alpha=5)
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 2 * 2  # two projections in two layers
    for wrapper in wrappers:
        A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        experts = wrapper.get_base_layer()
        ours = expert_delta(A, B, wrapper.scaling["default"], num_experts=wrapper.num_experts,
                            transposed=experts.is_transposed)
        expected = wrapper.get_delta_weight("default")
        assert ours.shape == getattr(experts, wrapper.parameter_name).shape
        torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_match_peft_with_the_same_factors(arch, use_rslora):
    base = _tiny(arch)
    ours = copy.deepcopy(base)
    peft_model = _peft(base, r=2, alpha=6, target_modules=["q_proj"], use_rslora=use_rslora)
    names = apply_lora(ours, ["q_proj", "gate_up_proj", "down_proj"], r=2, alpha=6, use_rslora=use_rslora)
    assert len(names) == 2 + 4
    factors = _peft_factors(peft_model)
    assert set(factors) == set(expert_lora_modules(ours))
    with torch.no_grad():
        for path, (A, B) in factors.items():
            layer = ours.get_submodule(path)
            assert layer.lora_A.shape == A.shape and layer.lora_B.shape == B.shape
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        for path, layer in lora_modules(ours).items():
            peft_layer = peft_model.base_model.model.get_submodule(path)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = random_ids(VOCAB, length=24)
    expected, got = logits_of(peft_model, x), logits_of(ours, x)
    assert (expected - logits_of(_tiny(arch), x)).abs().max() > 1e-2  # the update moves the logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_init_is_peft_init():
    """A kaiming-uniform (a=sqrt(5)) over fan_in = in, as nn.Linear(in, r*E) under PEFT's reset; B zero."""
    weight = torch.nn.Parameter(torch.zeros(8, 96, 64))
    layer = ExpertLoRA(weight, r=4, alpha=8, transposed=False)
    assert layer.lora_A.shape == (4 * 8, 64) and layer.lora_B.shape == (96, 4 * 8)
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5): gain sqrt(2 / 6), bound gain * sqrt(3 / fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert not layer.lora_B.any()
    assert not weight.requires_grad and layer.lora_A.requires_grad


# ------------------------------------------------------------------------------------------ the store contract

@pytest.mark.parametrize("transposed", [False, True])
def test_getitem_is_base_plus_delta_with_a_plain_parameter(transposed):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 48, 64))
    layer = ExpertLoRA(weight, r=2, alpha=4, transposed=transposed)
    torch.nn.init.normal_(layer.lora_B)
    delta = expert_delta(layer.lora_A, layer.lora_B, layer.scale, num_experts=4, transposed=transposed)
    assert layer.shape == weight.shape and layer.dtype == weight.dtype
    for e in (0, 3, torch.tensor(2)):
        torch.testing.assert_close(layer[e], weight[e] + delta[e])
    (layer[1].sum()).backward()
    assert weight.grad is None
    A_grad = layer.lora_A.grad.view(4, 2, -1)
    assert A_grad[1].abs().sum() > 0 and not A_grad[[0, 2, 3]].any()  # only expert 1's rows


def test_store_stand_in_reads_only_the_experts_asked_for():
    torch.manual_seed(0)
    dense = torch.randn(4, 128, 64)
    store = NF4ExpertsStandIn(dense)
    layer = ExpertLoRA(store, r=2, alpha=4, transposed=False)
    torch.nn.init.normal_(layer.lora_B)
    out = layer[torch.tensor(2)]
    assert store.reads.tolist() == [0, 0, 1, 0]
    delta = expert_delta(layer.lora_A, layer.lora_B, layer.scale, num_experts=4, transposed=False)
    from qlora_trainer import quant
    torch.testing.assert_close(out, quant.quantize_dequantize(dense[2].contiguous()) + delta[2])
    assert layer.shape == dense.shape and isinstance(layer.base, NF4ExpertsStandIn)


# ------------------------------------------------------------------------------------------ gradients

def _dense_mixtral_experts(x, idx, weights, W1, W2, d1, d2):
    """The experts of a Mixtral layer by hand, each token and each of its experts in turn, dense W + delta."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate, up = ((W1[e] + d1[e]) @ x[t]).chunk(2)
            out[t] += weights[t, k] * ((W2[e] + d2[e]) @ (F.silu(gate) * up))
    return out


def _dense_gpt_oss_experts(x, idx, weights, W1, b1, W2, b2, d1, d2, alpha, limit):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = x[t] @ (W1[e] + d1[e]) + b1[e]  # (E, in, out) storage: x @ W
            gate, up = h[::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
            glu = gate * torch.sigmoid(gate * alpha)
            out[t] += weights[t, k] * (((up + 1) * glu) @ (W2[e] + d2[e]) + b2[e])
    return out


def _peft_delta(A, B, scale, E):
    """PEFT's get_delta_weight formula for (E, out, in) storage, written out: einsum('o r e, e r i -> e o i')."""
    return torch.einsum("o r e, e r i -> e o i", B.reshape(B.shape[0], -1, E), A.reshape(E, -1, A.shape[-1])) * scale


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_gradient_against_dense_fp32(arch):
    model = _tiny(arch)
    experts = model.model.layers[0].mlp.experts
    apply_lora(experts_parent := model, ["layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"],
               r=3, alpha=6)
    assert experts_parent.config._experts_implementation == "eager"
    gate_up, down = experts.gate_up_proj, experts.down_proj
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in (gate_up, down):
            layer.lora_B.normal_()
    x = torch.randn(10, 64)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])  # every expert routed somewhere
    idx[0] = torch.tensor([0, 1])
    idx[1] = torch.tensor([2, 3])
    weights = torch.rand(10, 2)
    g = torch.randn(10, 64)
    (experts(x, idx, weights) * g).sum().backward()

    refs = [(layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_())
            for layer in (gate_up, down)]
    E = 4
    if arch == "mixtral":
        d1, d2 = (_peft_delta(A, B, 2.0, E) for A, B in refs)
        y = _dense_mixtral_experts(x.double(), idx, weights.double(), gate_up.base.double(), down.base.double(), d1, d2)
    else:
        d1, d2 = (_peft_delta(A, B, 2.0, E).transpose(1, 2) for A, B in refs)
        y = _dense_gpt_oss_experts(x.double(), idx, weights.double(), gate_up.base.double(),
                                   experts.gate_up_proj_bias.double(), down.base.double(),
                                   experts.down_proj_bias.double(), d1, d2, experts.alpha, experts.limit)
    (y * g.double()).sum().backward()
    for layer, (A, B) in zip((gate_up, down), refs):
        # ours runs in fp32, the reference in fp64: agreement to fp32 rounding of sums over tokens and experts
        torch.testing.assert_close(layer.lora_A.grad.double(), A.grad, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad.double(), B.grad, rtol=1e-3, atol=1e-4)
        assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ targets

@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_is_attention_and_every_expert_weight(arch):
    model = _tiny(arch)
    names = resolve_targets(model, "all-linear")
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert len(names) == 2 * 6
    assert not any(n.endswith(("gate", "router", "lm_head")) for n in names)
    assert set(expert_parameters(model)) <= set(names)


def test_named_targets_match_expert_weights_by_path():
    model = _tiny("qwen3_moe")
    assert resolve_targets(model, ["gate_up_proj"]) == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in (0, 1)]
    assert resolve_targets(model, ["layers.1.mlp.experts.down_proj"]) == ["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(UserError, match="gate_proj match no linear layer or expert weight.*gate_up_proj"):
        resolve_targets(model, ["gate_proj"])


def test_the_wrapped_model_runs_eager_experts_and_keeps_routers_frozen():
    model = _tiny("mixtral")
    assert model.config._experts_implementation != "eager"  # grouped_mm where torch has it
    apply_lora(model, "all-linear", r=2, alpha=4)
    assert model.config._experts_implementation == "eager"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(f"{k}" for k in lora_state_dict(model))
    assert all(".lora_" in n for n in trainable)


# ------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss_and_changes_only_lora(arch):
    model = _tiny(arch)
    apply_lora(model, ["gate_up_proj", "down_proj"], r=4, alpha=8)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(lora_state_dict(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = random_ids(VOCAB, length=16, seed=3)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (".lora_" in name), name


# ------------------------------------------------------------------------------------------ counting

@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameter_summary_counts_expert_lora_as_peft_does(arch):
    from qlora_trainer.lora import trainable_parameter_summary

    ours = _tiny(arch)
    apply_lora(ours, "all-linear", r=4, alpha=8)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    trainable, total = get_peft_model(_tiny(arch), config).get_nb_trainable_parameters()
    assert trainable_parameter_summary(ours)[:2] == (trainable, total)


@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_counts_the_expert_lora_tensors_of_a_config(arch):
    """estimate's LoRA tensors from config.json alone (torch-free) against the tensors apply_lora makes."""
    from qlora_trainer.estimate import RunSettings, lora_tensor_sizes
    from qlora_trainer.model_shape import shape_from_config

    model = _tiny(arch)
    apply_lora(model, ["gate_up_proj", "down_proj"], r=3, alpha=6)
    made = sorted(t.numel() for t in lora_state_dict(model).values())
    shape = shape_from_config(model.config.to_dict())
    assert sorted(lora_tensor_sizes(shape, RunSettings(rank=3, targets=("gate_up_proj", "down_proj")))) == made
