"""The GPT-2 family (transformers' Conv1D: weights stored (in, out), q/k/v fused in c_attn) on the NF4 + LoRA path:
bit-equality with transformers' 4-bit load, targets, PEFT's adapter layout and interop both ways, merge in the
checkpoint's own layout for both --into targets, generate and inspect."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from qlora_trainer import quant
from qlora_trainer.adapter import load_adapter_into, save_adapter
from qlora_trainer.cli import main
from qlora_trainer.generate import generate_ids
from qlora_trainer.loading import load_info, load_quantized
from qlora_trainer.lora import apply_lora, lora_modules, resolve_targets
from qlora_trainer.merge import merge
from tests.helpers import logits_of, random_ids, transformers_nf4

CONV1D_KINDS = {"c_attn", "c_proj", "c_fc"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_b(named_params, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(named_params, key=lambda kv: kv[0]):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def ours_adapter(gpt2, tmp_path_factory):
    """(our model with a random adapter, its folder)."""
    model = load_quantized(gpt2, compute_dtype="fp32", device="cpu", progress=False)
    apply_lora(model, r=4, alpha=8)
    _randomize_b(model.named_parameters())
    out = save_adapter(model, tmp_path_factory.mktemp("ours") / "adapter", base_model_name_or_path=str(gpt2))
    return model, out


@pytest.fixture(scope="module")
def peft_adapter(gpt2, tmp_path_factory):
    """(PEFT's model over transformers' NF4 GPT-2 with a random adapter, its folder)."""
    model = get_peft_model(transformers_nf4(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              lora_dropout=0.0, task_type="CAUSAL_LM"))
    _randomize_b(model.named_parameters(), seed=1)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return model.eval(), out


def test_conv1d_weights_quantize_bit_equal_to_transformers(gpt2):
    ours = load_quantized(gpt2, compute_dtype="fp32", device="cpu", progress=False)
    ref = transformers_nf4(gpt2)
    ours_layers = {n: m for n, m in ours.named_modules() if quant.is_nf4_linear(m)}
    ref_layers = {n: m for n, m in ref.named_modules() if quant.is_nf4_linear(m)}
    assert set(ours_layers) == set(ref_layers)
    assert {n.rsplit(".", 1)[-1] for n in ours_layers} == CONV1D_KINDS and len(ours_layers) == 4 * 2
    assert set(load_info(ours).swapped.values()) == {"conv1d"}
    for name, layer in ours_layers.items():
        theirs = ref_layers[name].weight
        assert (layer.out_features, layer.in_features) == (ref_layers[name].out_features, ref_layers[name].in_features)
        assert torch.equal(layer.weight.data, theirs.data), name
        mine, their_state = layer.weight.quant_state.as_dict(packed=True), theirs.quant_state.as_dict(packed=True)
        assert mine.keys() == their_state.keys()
        for key in mine:
            assert torch.equal(mine[key], their_state[key]), (name, key)
    # the checkpoint stores (in, out); the 4-bit weight dequantizes to (out, in) = its transpose
    c_attn = load_file(next(p for p in gpt2.glob("model-*.safetensors") if "transformer.h.0.attn.c_attn.weight"
                            in load_file(p)))["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (128, 384)
    assert quant.dequantize(ours_layers["transformer.h.0.attn.c_attn"]).shape == (384, 128)
    ids = random_ids(ours.config.vocab_size)
    assert torch.equal(logits_of(ours, ids), logits_of(ref, ids))
    assert ours.lm_head.weight is ours.transformer.wte.weight  # tied, never quantized


def test_all_linear_and_named_targets_cover_the_conv1d_layers_never_the_head(gpt2, peft_adapter):
    ours = load_quantized(gpt2, compute_dtype="fp32", device="cpu", progress=False)
    chosen = resolve_targets(ours, "all-linear")
    peft_model, _ = peft_adapter
    peft_wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
                    for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert set(chosen) == peft_wrapped
    assert {n.rsplit(".", 1)[-1] for n in chosen} == CONV1D_KINDS and "lm_head" not in chosen
    assert len(resolve_targets(ours, ["c_attn"])) == 2
    assert {n.rsplit(".", 1)[-1] for n in resolve_targets(ours, ["c_proj", "c_fc"])} == {"c_proj", "c_fc"}


def test_adapter_layout_equals_peft_over_transformers_4bit_gpt2(ours_adapter, peft_adapter):
    _, ours_dir = ours_adapter
    _, peft_dir = peft_adapter
    ours_cfg, peft_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (ours_dir, peft_dir))
    # over transformers' 4-bit load the Conv1D layers are 4-bit linears holding (out, in): PEFT writes False
    assert ours_cfg["fan_in_fan_out"] == peft_cfg["fan_in_fan_out"] is False
    ours_w, peft_w = (load_file(d / "adapter_model.safetensors") for d in (ours_dir, peft_dir))
    assert {k: tuple(v.shape) for k, v in ours_w.items()} == {k: tuple(v.shape) for k, v in peft_w.items()}
    assert ours_w["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 128)  # (r, in)
    assert ours_w["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (384, 4)  # (out, r)
    assert ours_w["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"].shape == (4, 512)


def test_our_adapter_loads_in_peft_and_peft_adapter_loads_in_ours(gpt2, ours_adapter, peft_adapter):
    ours_model, ours_dir = ours_adapter
    ids = random_ids(ours_model.config.vocab_size)
    theirs = PeftModel.from_pretrained(transformers_nf4(gpt2), ours_dir).eval()
    torch.testing.assert_close(logits_of(theirs, ids), logits_of(ours_model.eval(), ids), atol=1e-5, rtol=1e-5)

    peft_model, peft_dir = peft_adapter
    ours = load_quantized(gpt2, compute_dtype="fp32", device="cpu", progress=False)
    plain = logits_of(ours, ids)
    load_adapter_into(ours, peft_dir)
    got = logits_of(ours, ids)
    torch.testing.assert_close(got, logits_of(peft_model, ids), atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the output: the comparison means something


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # PEFT over a dense Conv1D: it fixes it
@pytest.mark.parametrize("into", ["dequantized", "original"])
def test_merge_keeps_conv1d_layout_and_gives_base_plus_adapter_logits(gpt2, ours_adapter, tmp_path, into):
    model, adapter = ours_adapter
    out = merge(gpt2, adapter, tmp_path / "merged", dtype="fp32", into=into, compute_dtype="fp32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(merged.transformer.h[0].attn.c_proj, Conv1D)
    ids = random_ids(merged.config.vocab_size)
    if into == "dequantized":
        reference = model.eval()  # the quantized base + adapter that was trained
    else:  # the unquantized base + the adapter, through PEFT's own Conv1D (fan_in_fan_out) path
        dense = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32)
        reference = PeftModel.from_pretrained(dense, adapter).eval()
    torch.testing.assert_close(logits_of(merged, ids), logits_of(reference, ids), atol=1e-4, rtol=1e-4)

    # each weight in the checkpoint's (in, out) layout: merged - base == (scale * B @ A).T, the square c_proj too
    base = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32)
    layer = lora_modules(model)["transformer.h.1.attn.c_proj"]
    delta = merged.transformer.h[1].attn.c_proj.weight - base.transformer.h[1].attn.c_proj.weight
    assert delta.shape == (128, 128)
    if into == "original":
        torch.testing.assert_close(delta, layer.delta_weight().T.detach(), atol=1e-5, rtol=1e-4)
    assert merged.transformer.h[0].attn.c_attn.weight.shape == (128, 384)


def test_generate_decodes_with_the_kv_cache_on_gpt2(ours_adapter):
    model, _ = ours_adapter
    model.eval()
    prompt = [5, 17, 33, 2]
    got = generate_ids(model, prompt, max_new_tokens=6, eos=set())
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence every step
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]


def _streamed(tokenizer, tokens: list[int]) -> str:
    """What streaming `tokens` prints: the longest decoded prefix that does not end in an incomplete UTF-8
    character (that is held back until its remaining bytes arrive, which they never do once the reply ends)."""
    for k in range(len(tokens), -1, -1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text


def test_generate_command_on_gpt2_prints_the_greedy_reply_of_peft_over_transformers(gpt2, ours_adapter, capsys):
    _, adapter = ours_adapter
    assert main(["generate", "--base", str(gpt2), "--adapter", str(adapter), "--prompt", "the cat",
                 "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    # The reference: transformers' greedy generate with PEFT over its NF4 load; the plain prompt (GPT-2 has no
    # chat template) as the tokenizer encodes it; the reply up to the first EOS.
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    assert tokenizer.chat_template is None
    reference = PeftModel.from_pretrained(transformers_nf4(gpt2), adapter).eval()
    prompt = tokenizer("the cat").input_ids
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        new = reference.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)[0, len(prompt):].tolist()
    new = new[:new.index(eos)] if eos in new else new
    assert printed == _streamed(tokenizer, new) + "\n"


def test_inspect_command_on_gpt2_prints_each_updates_spectrum_and_size(gpt2, ours_adapter, capsys):
    """Every module row against a dense fp64 reference: ranks, |dW|_F and the top singular values of
    scale * B @ A read from the adapter file, and |dW| / |W| for W bitsandbytes' dequantization of transformers'
    NF4 load (the weight training saw; (out, in) for the Conv1D layers too)."""
    import bitsandbytes.functional as F

    _, adapter = ours_adapter
    assert main(["inspect", str(adapter), "--base", str(gpt2), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = sorted(tuple(line.split()) for line in out.splitlines() if line.split()[:1] in (["c_attn"], ["c_proj"],
                                                                                            ["c_fc"])
                  and line.split()[1] != "mean")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    base = transformers_nf4(gpt2)
    expected = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        dense = scale * tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()  # (out, in)
        sigma = torch.linalg.svdvals(dense)[:config["r"]]  # the rest are zero: rank(B @ A) <= r
        energy = (sigma ** 2).cumsum(0) / (sigma ** 2).sum()
        r90, r99 = (int((energy < share).sum()) + 1 for share in (0.90, 0.99))
        weight = base.get_submodule(module).weight
        W = F.dequantize_4bit(weight.data, weight.quant_state)
        assert W.shape == dense.shape
        norm = float(torch.linalg.matrix_norm(dense))
        expected.append((module.rsplit(".", 1)[-1], module.split(".")[2], str(r90), str(r99),
                         f"{float(sigma[0] / sigma[-1]):.1f}", f"{norm:.3g}", f"{norm / float(W.double().norm()):.2%}",
                         *(f"{float(v):.3g}" for v in sigma[:4])))
    assert len(expected) == 4 * 2 and {row[0] for row in expected} == CONV1D_KINDS
    assert rows == sorted(expected)
