"""Chunked loss and gradient checkpointing against transformers' own unchunked loss (the reference)."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora, lora_modules, lora_state_dict
from qlora_trainer.loss import CausalLMLoss, chunked_cross_entropy
from qlora_trainer.train import enable_checkpointing
from tests.helpers import TINY


def _model_with_random_lora(path, seed=0):
    model = load_quantized(path, compute_dtype="fp32", device="cpu", progress=False)
    torch.manual_seed(seed)  # the same A in every copy
    apply_lora(model, "all-linear", r=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.05)
    return model.train()


def _batch(gen):
    ids = torch.randint(3, TINY["vocab_size"], (3, 17), generator=gen)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt with no loss
    labels[2, 12:] = -100  # right padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return ids, labels, mask


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_chunked_loss_and_gradients_equal_transformers_loss(tiny_llama, chunk_size):
    gen = torch.Generator().manual_seed(0)
    ids, labels, mask = _batch(gen)
    ours_model = _model_with_random_lora(tiny_llama)
    ref_model = _model_with_random_lora(tiny_llama)

    summed, n = CausalLMLoss(ours_model, chunk_size)(input_ids=ids, labels=labels, attention_mask=mask)
    assert n == int((labels[:, 1:] != -100).sum())
    (summed / n).backward()
    ref = ref_model(input_ids=ids, attention_mask=mask, labels=labels).loss  # full logits, mean over tokens
    ref.backward()

    torch.testing.assert_close(summed / n, ref, rtol=1e-6, atol=1e-6)
    ours_grads, ref_grads = lora_state_dict(ours_model), lora_state_dict(ref_model)
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name].grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7)


def test_chunked_loss_skips_untrained_tokens_before_the_projection():
    """Only rows with a label reach lm_head: count the rows it sees."""
    seen = []
    head = torch.nn.Linear(8, 11, bias=False)
    head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 3], labels[1, 5] = 4, 7
    summed, n = chunked_cross_entropy(hidden, head, labels, chunk_size=1)
    assert n == 2 and seen == [1, 1]
    logits = head(hidden).float()  # reference: plain shifted cross-entropy
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    torch.testing.assert_close(summed, expected)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    gen = torch.Generator().manual_seed(1)
    ids, labels, mask = _batch(gen)
    plain, checkpointed = _model_with_random_lora(tiny_llama), _model_with_random_lora(tiny_llama)
    enable_checkpointing(checkpointed)
    assert checkpointed.model.gradient_checkpointing
    for model in (plain, checkpointed):
        summed, n = CausalLMLoss(model, 5)(input_ids=ids, labels=labels, attention_mask=mask)
        (summed / n).backward()
    a, b = lora_state_dict(plain), lora_state_dict(checkpointed)
    for name in a:
        assert a[name].grad is not None and torch.count_nonzero(a[name].grad) > 0
        torch.testing.assert_close(a[name].grad, b[name].grad, rtol=1e-6, atol=1e-8)
