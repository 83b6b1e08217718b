"""What only CUDA exercises: bitsandbytes' CUDA NF4 kernels under bf16 compute, checked against transformers' NF4
load with PEFT on the same GPU, and the CUDA generator in the checkpoint's RNG state. Marked `gpu`: skipped (with the
reason) where torch.cuda.is_available() is False, e.g. in CI."""

from __future__ import annotations

import json

import bitsandbytes.functional as F
import pytest
import torch
from peft import PeftModel

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import quant
from qlora_trainer.adapter import save_adapter
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora, lora_modules
from tests.helpers import TINY, random_ids, transformers_nf4

pytestmark = pytest.mark.gpu


def _nf4_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if quant.is_nf4_linear(m)}


def test_our_bf16_lora_on_cuda_matches_peft_over_transformers_nf4(tiny_llama, tmp_path):
    """Ours in bf16 on CUDA against PEFT over transformers + bitsandbytes NF4 in bf16 on CUDA, same A and B: the
    same 4-bit weights, logits to bf16 tolerance, and the LoRA gradients.

    The two differ only in rounding: ours runs the LoRA matmuls in bf16, PEFT in fp32 before casting back. On CPU
    at this size that is at most 0.01 in the logits (|logits| < 1) and 2% in a gradient's norm; the bounds below
    leave 3-4x room, and the adapter moves the logits by ~0.8, far more."""
    ours = load_quantized(tiny_llama, compute_dtype="bf16", device="cuda", progress=False)
    base = transformers_nf4(tiny_llama, torch.bfloat16, device="cuda")
    theirs = _nf4_layers(base)
    assert set(_nf4_layers(ours)) == set(theirs) and len(theirs) == 7 * TINY["num_hidden_layers"]
    for name, layer in _nf4_layers(ours).items():  # quantized on the GPU by both: the same codes and scales
        assert layer.weight.device.type == "cuda"
        assert torch.equal(layer.weight.data, theirs[name].weight.data), name
        assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                           F.dequantize_4bit(theirs[name].weight.data, theirs[name].weight.quant_state)), name

    apply_lora(ours, "all-linear", r=8, alpha=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_modules(ours).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen).to(layer.lora_B.device) * 0.05)
    folder = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tiny_llama))

    ids = random_ids(TINY["vocab_size"], length=24).cuda()
    with torch.no_grad():
        plain = base(ids).logits.float()
    reference = PeftModel.from_pretrained(base, folder, is_trainable=True)
    ours.train()
    reference.train()
    ours_logits, ref_logits = ours(ids).logits, reference(input_ids=ids).logits
    assert ours_logits.dtype == ref_logits.dtype == torch.bfloat16
    ours_logits, ref_logits = ours_logits.float(), ref_logits.float()
    assert (ours_logits - ref_logits).abs().max() < 0.03
    assert (ref_logits - plain).abs().max() > 0.3  # the adapter matters: the comparison could fail

    ours_logits.logsumexp(-1).mean().backward()
    ref_logits.logsumexp(-1).mean().backward()
    for name, layer in lora_modules(ours).items():
        peft_layer = reference.base_model.model.get_submodule(name)
        for mine, theirs_grad in ((layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad),
                                  (layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)):
            assert mine.dtype == theirs_grad.dtype == torch.float32
            assert float((mine - theirs_grad).norm() / theirs_grad.norm()) < 0.08, name


def test_checkpoint_rng_state_restores_the_cuda_generator():
    """Resume replays dropout masks drawn on the GPU: the state a checkpoint stores (as JSON) holds the CUDA
    generator's, and restoring it gives the same draws."""
    torch.cuda.manual_seed_all(1234)
    torch.rand(3, device="cuda")  # move it past its seed
    saved = json.loads(json.dumps(ckpt.rng_state()))  # as trainer_state.json keeps it
    assert len(saved["cuda"]) == torch.cuda.device_count()
    x = torch.ones(4096, device="cuda")
    expected = (torch.rand(1000, device="cuda"), torch.nn.functional.dropout(x, 0.1, training=True))
    torch.cuda.manual_seed_all(99)  # anything else in between
    torch.rand(5, device="cuda")
    ckpt.set_rng_state(saved)
    again = (torch.rand(1000, device="cuda"), torch.nn.functional.dropout(x, 0.1, training=True))
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    torch.cuda.manual_seed_all(99)
    assert not torch.equal(torch.rand(1000, device="cuda"), expected[0])  # the draws depend on the state
