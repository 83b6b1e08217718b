"""Mixture-of-experts checkpoints (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert, gpt-oss) in the layouts
they are published in: our streaming NF4 load against transformers' own fp32 load of the same folder, the NF4 bits
of an expert against bitsandbytes, the loader's memory per layer, training, and the errors."""

from __future__ import annotations

import json
import shutil
import sys
import weakref

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_trainer import loading, quant
from qlora_trainer.errors import UserError
from qlora_trainer.experts import NF4ExpertWeights, is_nf4_experts
from qlora_trainer.expert_layout import looks_per_expert
from qlora_trainer.loading import load_info
from qlora_trainer.model_summary import model_summary
from tests.helpers import REPO, load_ours, logits_of, random_ids
from tests.moe_helpers import our_experts_into

sys.path.insert(0, str(REPO / "scripts"))
from make_tiny_moe import LAYOUTS  # noqa: E402

CHECKPOINTS = [(arch, layout) for arch, layouts in LAYOUTS.items() if arch != "gemma2" for layout in layouts]
IDS = [f"{arch}-{layout}" for arch, layout in CHECKPOINTS]

pytestmark = pytest.mark.usefixtures("one_thread")


def transformers_fp32(folder):
    """transformers' own load of the folder: its conversion mapping fuses per-expert tensors; fp32; the eager experts
    forward (one expert at a time, the code path ours runs)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


def dequantized_into(reference, ours) -> None:
    """Replace every weight that ours stores in NF4 by its dequantized value (quant.py's own dequantization): the
    reference then computes with exactly our weights, through transformers' code."""
    our_experts_into(reference, ours)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if quant.is_nf4_linear(module):
                reference.get_submodule(name).weight.copy_(quant.dequantize(module))

def test_per_expert_checkpoints_are_what_transformers_saves(tiny_moe):
    """The per-expert fixtures really are per expert (save_pretrained reverts the fused parameters), the fused ones
    fused: otherwise the layout tests below would test one layout twice."""
    for (arch, layout), folder in tiny_moe.items():
        keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        per_expert = [k for k in keys if looks_per_expert(k)]
        assert bool(per_expert) == (layout == "per_expert"), (arch, layout)
        assert len(set(keys.values())) >= 3  # sharded: the streaming path


@pytest.mark.parametrize("arch,layout", CHECKPOINTS, ids=IDS)
def test_logits_equal_transformers_with_our_nf4_weights(tiny_moe, arch, layout):
    folder = tiny_moe[arch, layout]
    ours = load_ours(folder)
    info = load_info(ours)
    assert info.experts and all(is_nf4_experts(ours.get_submodule(n)) for n in info.experts)
    assert ours.config._experts_implementation == "eager"
    reference = transformers_fp32(folder)
    ids = random_ids(ours.config.vocab_size, length=12)
    plain = logits_of(reference, ids)
    dequantized_into(reference, ours)
    mine = logits_of(ours, ids)
    torch.testing.assert_close(mine, logits_of(reference, ids), rtol=0, atol=1e-5)
    # against the unquantized weights: NF4's rounding (and the routing it flips), far from unrelated logits
    cosine = torch.nn.functional.cosine_similarity(mine.flatten(), plain.flatten(), dim=0)
    assert cosine > (0.85 if layout == "mxfp4" else 0.93)  # 0.965-0.986 here; 0.90 for random MXFP4 codes


@pytest.mark.parametrize("arch,layout", [("mixtral", "per_expert"), ("gpt_oss", "fused")])
def test_an_expert_is_bit_identical_to_bitsandbytes(tiny_moe, arch, layout):
    """Expert 2 of layer 1's gate_up_proj: packed codes, both levels of absmax and the offset equal
    bitsandbytes' own quantize_4bit of that expert's weight (in the compute dtype, as transformers casts a linear
    before quantizing it), and our dequantized weight equals bitsandbytes' dequantize_4bit of it."""
    folder = tiny_moe[arch, layout]
    ours = load_ours(folder)
    name = next(n for n in load_info(ours).experts if ".layers.1." in n and n.endswith("gate_up_proj"))
    weight = transformers_fp32(folder).get_parameter(name)[2].detach()  # the bf16 values, cast to fp32
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    storage: NF4ExpertWeights = ours.get_submodule(name)
    assert torch.equal(storage.packed[2], packed.view(-1))
    assert torch.equal(storage.absmax[2], state.absmax)
    assert torch.equal(storage.absmax2[2], state.state2.absmax)
    assert torch.equal(storage.offset[2], state.offset.reshape(()))
    assert torch.equal(storage[2], bnbf.dequantize_4bit(packed, state))
    assert storage[torch.tensor(2)].shape == weight.shape and storage.dtype == torch.float32


def test_indexing_dequantizes_only_the_expert_asked_for(tiny_moe, monkeypatch):
    """One forward dequantizes each routed expert of each layer once, one at a time: never a whole 3-D tensor."""
    ours = load_ours(tiny_moe["qwen3_moe", "per_expert"])
    shapes = []
    real = quant.dequantize_nf4_parts
    monkeypatch.setattr(quant, "dequantize_nf4_parts",
                        lambda *a, **k: shapes.append(tuple(a[4])) or real(*a, **k))
    logits_of(ours, random_ids(ours.config.vocab_size, length=12))
    assert shapes and all(len(shape) == 2 for shape in shapes)
    experts = ours.config.num_experts
    assert len(shapes) <= ours.config.num_hidden_layers * 2 * experts  # gate_up and down, each routed expert once


def test_the_loader_holds_one_layers_experts_at_most(tiny_moe, monkeypatch):
    """Instrumented stream: every per-expert tensor the loader receives is tracked until it is freed; the most bytes
    alive at once stay within one layer's experts (the per-expert tensors of one layer's fused parameters), while the
    checkpoint holds two layers' worth."""
    folder = tiny_moe["mixtral", "per_expert"]
    alive, peak, total = [0], [0], [0]
    real_stream = loading.stream_tensors

    def tracked(files, device):
        for key, tensor, file in real_stream(files, device):
            if looks_per_expert(key):
                nbytes = tensor.numel() * tensor.element_size()
                alive[0] += nbytes
                total[0] += nbytes
                peak[0] = max(peak[0], alive[0])
                weakref.finalize(tensor, lambda n=nbytes: alive.__setitem__(0, alive[0] - n))
            yield key, tensor, file
            del tensor

    monkeypatch.setattr(loading, "stream_tensors", tracked)
    model = load_ours(folder)
    config = model.config
    one_layer = config.num_local_experts * 3 * config.intermediate_size * config.hidden_size * 2  # bf16
    assert total[0] == config.num_hidden_layers * one_layer
    assert 0 < peak[0] <= one_layer
    assert alive[0] == 0  # nothing kept after the load


def test_summary_counts_the_experts_as_4_bit(tiny_moe):
    model = load_ours(tiny_moe["qwen2_moe", "per_expert"])
    text = model_summary(model)
    config = model.config
    params = config.num_hidden_layers * config.num_experts * 3 * config.moe_intermediate_size * config.hidden_size
    line = next(line for line in text.splitlines() if "expert weights" in line)
    assert f"{params / 1e6:.2f}M params" in line
    experts_mib = sum(m.nbytes() for m in model.modules() if is_nf4_experts(m)) / 2**20
    assert experts_mib < 0.3 * params * 2 / 2**20  # about a quarter of their bf16 bytes
    assert "shared_expert" not in line  # the shared expert is plain linears, counted with them
    assert any(n.endswith("shared_expert.down_proj") for n in load_info(model).swapped)


@pytest.mark.parametrize("method", ["bitsandbytes", "no-such-method"])
def test_a_checkpoint_stored_in_a_quantization_transformers_cannot_undo_is_one_clear_error(tiny_moe, tmp_path,
                                                                                            method):
    """gpt-oss's MXFP4 loads (transformers' quantizer dequantizes it, the tests above); a checkpoint saved already
    in 4-bit bitsandbytes, or in a method transformers does not know, cannot be read back to full precision."""
    folder = tmp_path / "prequantized"
    shutil.copytree(tiny_moe["gpt_oss", "fused"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"config.json: this checkpoint is stored quantized \(quantization_config "
                                        rf"quant_method='{method}'.*use the model's bf16/fp16/fp32 release"):
        load_ours(folder)


def test_per_expert_tensors_transformers_cannot_fuse_are_one_clear_error(tiny_moe, tmp_path):
    """An expert layout transformers has no conversion for (gpt-oss split per expert): one error naming the tensor
    and the architecture, not a traceback."""
    from safetensors.torch import load_file, save_file

    source = tiny_moe["gpt_oss", "fused"]
    folder = tmp_path / "split"
    shutil.copytree(source, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if k.endswith("layers.0.mlp.experts.down_proj"))
    shard = folder / index["weight_map"].pop(key)
    tensors = load_file(shard)
    fused = tensors.pop(key)
    for e in range(fused.shape[0]):
        name = key.replace("experts.down_proj", f"experts.{e}.down_proj.weight")
        tensors[name] = fused[e].contiguous()
        index["weight_map"][name] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"per-expert tensor, and transformers has no weight conversion for "
                                        r"GptOssForCausalLM \(model_type='gpt_oss'\)"):
        load_ours(folder)


def test_training_lowers_the_loss_on_a_tiny_moe(tiny_moe, tmp_path):
    """The train command's run (NF4 experts, gradient checkpointing, LoRA on attention) on one repeated sentence."""
    from qlora_trainer import train as train_mod
    from qlora_trainer.config import build_config

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": "the red cat sees the big dog near the old house"}) + "\n"
                            for _ in range(16)))
    cfg = build_config({"model.path": str(tiny_moe["mixtral", "per_expert"]), "model.compute_dtype": "fp32",
                        "data.path": str(rows), "data.format": "text", "data.max_seq_len": 32,
                        "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
                        "lora.targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "train.optimizer": "adamw",
                        "train.batch_size": 4, "train.lr": 1e-2, "train.warmup_steps": 0, "train.max_steps": 16,
                        "train.save_every": 100, "train.log_every": 1, "out": str(tmp_path / "run")})
    train_mod.train(cfg, progress=False, log=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 16
    assert losses[-1] < 0.85 * losses[0]  # from ln(vocab) = 6.2 to about 4.9 (attention LoRA alone)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_estimate_counts_the_experts_as_4_bit(tiny_moe, arch):
    """estimate's NF4 bytes, from config.json alone, are the bytes our load holds in its 4-bit linears and NF4
    experts; and far below the same experts in the compute dtype."""
    from qlora_trainer.estimate import RunSettings, estimate_memory

    layout = LAYOUTS[arch][0]
    folder = tiny_moe[arch, layout]
    model = load_ours(folder)
    held = sum(quant.quantized_bytes(m) for m in model.modules() if quant.is_nf4_linear(m))
    experts = sum(m.nbytes() for m in model.modules() if is_nf4_experts(m))
    config = json.loads((folder / "config.json").read_text())
    estimate = estimate_memory(config, RunSettings(compute_dtype="fp32", targets=["q_proj", "v_proj"]))
    assert estimate.quantized_weights == held + experts
    dense_experts = sum(m.shape.numel() for m in model.modules() if is_nf4_experts(m)) * 4
    assert experts < 0.15 * dense_experts


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_the_backward_keeps_no_dequantized_expert_alive_and_gets_the_same_gradients(tiny_moe, monkeypatch,
                                                                                     checkpointing):
    """Between forward and backward, no dequantized expert weight stays alive (autograd keeps (storage, e) and
    dequantizes again), where transformers' forward alone would keep every routed expert; and the LoRA gradients
    equal those of the same model with the experts' saved-tensor hooks removed (weights kept as they are)."""
    from qlora_trainer import experts as experts_mod
    from qlora_trainer.lora import apply_lora
    from qlora_trainer.training import enable_checkpointing

    ids = random_ids(500, length=24, seed=1)

    def run(hooks: bool):
        model = load_ours(tiny_moe["qwen3_moe", "per_expert"])
        if not hooks:
            for module in model.modules():
                if experts_mod.is_experts_module(module):
                    module._forward_pre_hooks.clear()
                    module._forward_hooks.clear()
        apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for param in model.parameters():
                if param.requires_grad:
                    param.data.normal_(0, 0.1)
        model.train()
        if checkpointing:
            enable_checkpointing(model)
        alive = []
        real = NF4ExpertWeights._dequantize
        monkeypatch.setattr(NF4ExpertWeights, "_dequantize", lambda self, e: alive.append(weakref.ref(
            w := real(self, e))) or w)
        loss = model(input_ids=ids, labels=ids).loss
        held = sum(ref() is not None for ref in alive)
        loss.backward()
        monkeypatch.setattr(NF4ExpertWeights, "_dequantize", real)
        return held, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    held, grads = run(hooks=True)
    held_without, reference = run(hooks=False)
    assert held == 0
    if not checkpointing:
        assert held_without >= 2 * 2  # at least one routed expert's two weights per layer, kept by autograd
    assert grads.keys() == reference.keys()
    for name in grads:
        assert torch.equal(grads[name], reference[name]), name


def test_random_quantized_fills_the_experts_like_transformers_initializes_them():
    """random_quantized (benchmarks of shapes no checkpoint has) builds MoE models with NF4 experts too: every expert
    is filled (normal, std = initializer_range, up to NF4 rounding) and the model computes finite logits."""
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, num_local_experts=4)
    model = loading.random_quantized(config, compute_dtype="fp32", device="cpu", progress=False)
    storages = [m for m in model.modules() if is_nf4_experts(m)]
    assert len(storages) == 2 * 2 and set(load_info(model).experts) == {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    for storage in storages:
        stds = torch.stack([storage[e].std() for e in range(storage.num_experts)])
        assert torch.allclose(stds, torch.full_like(stds, config.initializer_range), rtol=0.1)
    assert torch.isfinite(logits_of(model, random_ids(256))).all()
