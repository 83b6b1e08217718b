"""generate and inspect on a fused MoE model with LoRA on its experts: greedy generation against PEFT over
transformers, per-expert spectra against a dense SVD of each expert's update, per-expert rows in the table, the
truncation of expert factors, and the one-adapter-only rule of batched serving."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

from qlora_trainer.adapter import read_adapter, save_adapter
from qlora_trainer.errors import UserError
from qlora_trainer.expert_lora import expert_delta
from qlora_trainer.generate import generate_ids, load_for_generation, render_prompt
from qlora_trainer.inspect_adapter import attach_base_norms, error_table, table, write_truncated
from qlora_trainer.lora import apply_lora
from qlora_trainer.multi_adapter import load_adapters_into
from qlora_trainer.spectrum import model_spectra, spectra
from tests.helpers import load_ours, random_lora_b
from tests.moe_helpers import transformers_nf4_with_our_experts, write_fused_moe

warnings.filterwarnings("ignore", message=".*RoPE.*")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(fused tiny Mixtral, an adapter on attention and experts with random B, the model it was saved from)."""
    root = tmp_path_factory.mktemp("moe-use")
    base = write_fused_moe(root / "base", "mixtral")
    model = load_ours(base)
    apply_lora(model, "all-linear", r=4, alpha=8)
    random_lora_b(model, std=0.5)
    return base, save_adapter(model, root / "adapter", base_model_name_or_path=str(base)), model


def _greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by full forwards (no cache): the reference for our cached loop."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


def test_generate_with_expert_lora_equals_peft_over_transformers(moe):
    base, adapter, _ = moe
    model, tokenizer = load_for_generation(base, adapter, compute_dtype="fp32", device="cpu")
    ids = render_prompt(tokenizer, "what is 2 + 3 ?")
    ours = generate_ids(model, ids, max_new_tokens=8, eos={tokenizer.eos_token_id})
    reference = PeftModel.from_pretrained(transformers_nf4_with_our_experts(base), adapter).eval()
    assert ours == _greedy(reference, ids, 8, tokenizer.eos_token_id)
    plain, _ = load_for_generation(base, compute_dtype="fp32", device="cpu")
    assert ours != generate_ids(plain, ids, max_new_tokens=8, eos={tokenizer.eos_token_id})


def test_spectra_are_one_per_expert_and_match_a_dense_svd(moe):
    _, folder, model = moe
    adapter = read_adapter(folder)
    found = spectra(adapter.weights, adapter.scale, adapter.r, adapter.experts)
    experts = [s for s in found if s.expert is not None]
    assert len(experts) == 2 * 2 * 4  # two projections, two layers, four experts
    path = "model.layers.1.mlp.experts.gate_up_proj"
    A, B = adapter.experts[path]
    delta = expert_delta(A, B, adapter.scale, num_experts=4, transposed=False)
    for s in experts:
        if s.name == path:
            expected = torch.linalg.svdvals(delta[s.expert].double())[:adapter.r]
            torch.testing.assert_close(s.sigma, expected, rtol=1e-6, atol=1e-9)
    assert [(s.name, s.expert, s.rank90) for s in model_spectra(model)] == \
        [(s.name, s.expert, s.rank90) for s in found]


def test_table_has_a_row_per_expert_grouped_by_projection(moe):
    base, folder, _ = moe
    adapter = read_adapter(folder)
    found = spectra(adapter.weights, adapter.scale, adapter.r, adapter.experts)
    attach_base_norms(found, adapter, base, device="cpu")
    lines = table(found).splitlines()
    labels = [line.split()[0] for line in lines[2:]]
    first = labels.index("gate_up_proj[0]")
    assert labels[first:first + 4] == [f"gate_up_proj[{e}]" for e in range(4)]
    assert [line.split()[1] for line in lines[2 + first:2 + first + 4]] == ["0"] * 4
    assert "gate_up_proj" in labels and "down_proj[3]" in labels  # the projection's mean row closes its group
    experts = [s for s in found if s.expert == 2 and s.name.endswith("layers.0.mlp.experts.down_proj")]
    dense = load_ours(base).model.layers[0].mlp.experts.down_proj[2]
    assert experts[0].base_norm == pytest.approx(float(dense.double().norm()))


def test_truncation_keeps_each_experts_best_rank_k(moe, tmp_path):
    _, folder, _ = moe
    adapter = read_adapter(folder)
    errors = write_truncated(adapter, 2, tmp_path / "r2")
    truncated = read_adapter(tmp_path / "r2")
    path = "model.layers.0.mlp.experts.down_proj"
    A, B = truncated.experts[path]
    assert A.shape == (2 * 4, A.shape[1]) and truncated.config["target_parameters"] == adapter.config[
        "target_parameters"]
    new = expert_delta(A, B, truncated.scale, num_experts=4, transposed=False)
    old = expert_delta(*adapter.experts[path], adapter.scale, num_experts=4, transposed=False)
    for e in range(4):
        U, S, Vh = torch.linalg.svd(old[e].double())
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        torch.testing.assert_close(new[e].double(), best, rtol=1e-4, atol=1e-5)
        assert errors[f"{path}[{e}]"] == pytest.approx(float(S[2:].norm() / S.norm()), rel=1e-5)
    assert "down_proj[3]" in error_table(errors)


def test_batched_serving_refuses_expert_lora(moe):
    base, folder, _ = moe
    with pytest.raises(UserError, match="LoRA on expert weights .* serve this adapter on its own"):
        load_adapters_into(load_ours(base), {"a": folder})
