"""estimate.py against independently computed numbers: bytes of a real NF4 model built by bitsandbytes, a real
LoRA model and its gradients, real optimizers after a step, and the tensors autograd actually saves in a real
LlamaDecoderLayer with our LoRA layers, all on a small GQA LLaMA on CPU; public facts about Llama-3-8B; and the
search functions against the estimate itself."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.errors import UserError
from qlora_trainer.estimate import (
    GIB,
    RunSettings,
    estimate_memory,
    layer_saved_bytes_per_token,
    max_batch_that_fits,
    max_seq_len_that_fits,
    nf4_bytes,
    read_config_json,
    shape_from_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: a second thread only adds contention

LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
}
TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False,
}
# The model the tests below build for real: GQA (6 heads, 2 kv heads, head_dim 32); NF4 block counts that are not
# multiples of 256 (q_proj: 576 blocks), so the double quantization's ceil matters.
SMALL = {
    "model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False,
}
SOME_TARGETS = ("q_proj", "v_proj", "down_proj")


def small_model(compute_dtype: str = "fp32"):
    """SMALL built straight into NF4 by random_quantized: real bitsandbytes weights and quant states."""
    from transformers import LlamaConfig

    from qlora_trainer.loading import random_quantized

    config = LlamaConfig(**{k: v for k, v in SMALL.items() if k != "model_type"})
    return random_quantized(config, compute_dtype=compute_dtype, device="cpu", progress=False)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tensor shared by several holders counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def quant_state_tensors(state):
    """Every tensor a bitsandbytes QuantState holds, nested states included (found by walking it, not by name)."""
    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, type(state)):
            yield from quant_state_tensors(value)


def lora_params(model) -> list[torch.nn.Parameter]:
    from qlora_trainer.lora import lora_state_dict

    return list(lora_state_dict(model).values())


# ------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_quantized_weights_equal_the_bytes_bitsandbytes_holds(compute_dtype):
    """Every tensor of every 4-bit linear, found by walking its QuantState (quant.quantized_bytes, which leaves
    out the fp32 offset, is not the reference)."""
    from qlora_trainer.loading import load_info

    model = small_model(compute_dtype)
    swapped = load_info(model).swapped
    assert len(swapped) == 7 * SMALL["num_hidden_layers"]
    tensors = []
    for name in swapped:
        weight = model.get_submodule(name).weight
        tensors += [weight.data, *quant_state_tensors(weight.quant_state)]
    # the packed 4-bit codes, the uint8 absmax per 64, the nested fp32 absmax per 256, both code tables and the
    # fp32 offset: 6 tensors per linear, none shared between linears
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 6 * len(swapped)
    assert estimate_memory(SMALL, RunSettings(seq_len=8)).quantized_weights == storage_bytes(tensors)


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_dense_weights_equal_the_model_s_other_parameters(compute_dtype):
    from qlora_trainer import quant
    from qlora_trainer.names import torch_dtype

    model = small_model(compute_dtype)
    dense = [p for p in model.parameters() if not quant.is_nf4_param(p)]
    assert {p.dtype for p in dense} == {torch_dtype(compute_dtype)}
    expected = estimate_memory(SMALL, RunSettings(seq_len=8, compute_dtype=compute_dtype)).dense_weights
    assert expected == storage_bytes(dense)


def test_tied_embeddings_count_once(tmp_path):
    """A tied checkpoint loaded as the trainer loads it: lm_head and embed_tokens share one tensor."""
    from qlora_trainer import quant
    from qlora_trainer.loading import load_quantized
    from tests.helpers import write_tiny_llama

    overrides = {k: v for k, v in SMALL.items() if k not in ("model_type", "tie_word_embeddings")}
    path = write_tiny_llama(tmp_path / "tied", tied=True, shard_size=None, **overrides)
    model = load_quantized(path, compute_dtype="bf16", device="cpu", progress=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    dense = [p for p in model.parameters() if not quant.is_nf4_param(p)]
    config = {**SMALL, "tie_word_embeddings": True}
    assert estimate_memory(config, RunSettings(seq_len=8)).dense_weights == storage_bytes(dense)


# ------------------------------------------------------------------------------------------- LoRA and optimizer


@pytest.mark.parametrize("targets", ["all-linear", SOME_TARGETS], ids=["all-linear", "q-v-down"])
@pytest.mark.parametrize("rank", [4, 16])
def test_lora_params_and_grads_equal_a_real_lora_model(targets, rank):
    from qlora_trainer.lora import apply_lora

    model = small_model()
    apply_lora(model, list(targets) if isinstance(targets, tuple) else targets, r=rank, dropout=0.05)
    model.train()
    model(input_ids=torch.randint(0, SMALL["vocab_size"], (2, 16))).logits.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    b = estimate_memory(SMALL, RunSettings(seq_len=8, rank=rank, targets=targets))
    assert b.lora_param_count == sum(p.numel() for p in trainable)
    assert b.lora_params == storage_bytes(trainable)
    assert len(grads) == len(trainable) and b.lora_grads == storage_bytes(grads)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
@pytest.mark.parametrize("rank", [4, 8, 23])  # 8-bit: none; 4096-element tensors (the bound); 17.25 blocks (ceil)
def test_optimizer_state_equals_a_real_optimizer_after_one_step(optimizer, rank):
    from qlora_trainer.lora import apply_lora
    from qlora_trainer.quant import make_optimizer

    model = small_model()
    apply_lora(model, "all-linear", r=rank)
    params = lora_params(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")  # same state, not paged
        opt = make_optimizer(optimizer, params, lr=1e-3, weight_decay=0.01)
        generator = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    assert set(opt.state) == set(params)
    # torch AdamW's `step` is a 0-d CPU tensor even for CUDA parameters unless fused or capturable (the trainer
    # uses neither: torch/optim/adam.py `device="cpu"`), so it takes no GPU memory; bitsandbytes' is an int.
    state = [v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    expected = estimate_memory(SMALL, RunSettings(seq_len=8, rank=rank, optimizer=optimizer)).optimizer_state
    assert expected == storage_bytes(state)


# ------------------------------------------------------------------------------------------- activations


def _saved_by_one_layer(model, x: torch.Tensor) -> tuple[int, set[str]]:
    """Bytes of the distinct tensors autograd saves while layer 0 runs forward on x (B, T, hidden), beside
    the parameters and the layer's inputs (x, which the checkpoint keeps, and RoPE's cos and sin, made once
    for all layers); and the names of the backward nodes, to tell which attention kernel ran."""
    layer = model.model.layers[0]
    position_ids = torch.arange(x.shape[1])[None]
    cos, sin = model.model.rotary_emb(x, position_ids)
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x, cos, sin]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in kept:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, attention_mask=None, position_ids=position_ids, position_embeddings=(cos, sin))
    visited, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in visited:
            visited.add(node)
            stack += [n for n, _ in node.next_functions]
    return sum(saved.values()), {node.name() for node in visited}


@pytest.mark.parametrize("compute_dtype, dropout, targets, rank", [
    ("fp32", 0.0, "all-linear", 8),
    ("bf16", 0.0, "all-linear", 16),
    ("bf16", 0.05, "all-linear", 16),  # the trainer's default dropout
    ("fp32", 0.1, SOME_TARGETS, 8),
    ("bf16", 0.0, SOME_TARGETS, 4),
    ("bf16", 0.0, ("k_proj", "gate_proj"), 8),
])
def test_layer_saved_bytes_equal_what_autograd_saves(compute_dtype, dropout, targets, rank):
    """Every tensor autograd saves in a real LlamaDecoderLayer (transformers, sdpa) with our LoRA layers over
    the real 4-bit base, counted once each, at two sequence lengths: exact, after one stated CPU difference.

    Kernel: CPU SDPA runs the flash kernel here (no mask, GQA inside the kernel), which saves what CUDA's flash
    kernel saves per token (q, k, v, the output, an fp32 logsumexp per head); CUDA's also keeps RNG seed and
    offset scalars, not per token. Every other saved tensor comes from device-independent autograd formulas.
    The one difference: CPU dropout is unfused (input * noise) and keeps its mask in the compute dtype, where
    CUDA's fused dropout (the one the estimate models) keeps a bool mask: CPU saves (dtype bytes - 1) more per
    element of each LoRA input.
    Not per token and not in the estimate: the compute-dtype copies of A and B that LoRALinear casts and the
    matmuls save (none in fp32)."""
    from qlora_trainer.lora import apply_lora

    torch.manual_seed(0)
    model = small_model(compute_dtype)
    apply_lora(model, list(targets) if isinstance(targets, tuple) else targets, r=rank, dropout=dropout)
    model.train()
    run = RunSettings(seq_len=8, rank=rank, targets=targets, compute_dtype=compute_dtype, lora_dropout=dropout)
    shape, a = shape_from_config(SMALL), 4 if compute_dtype == "fp32" else 2
    lora_inputs = sum(i for name, (o, i) in shape.linear_shapes().items() if name in run.targets)
    cpu_dropout_mask = (a - 1) * lora_inputs if dropout else 0
    per_token = layer_saved_bytes_per_token(shape, run) + cpu_dropout_mask
    cast_lora_weights = 0 if a == 4 else sum(a * rank * (o + i) for name, (o, i) in shape.linear_shapes().items()
                                             if name in run.targets)
    dtype = torch.float32 if a == 4 else torch.bfloat16
    for seq_len in (32, 64):
        x = torch.randn(2, seq_len, shape.hidden, dtype=dtype, requires_grad=True)
        saved, nodes = _saved_by_one_layer(model, x)
        assert "ScaledDotProductFlashAttentionForCpuBackward0" in nodes, f"not the flash kernel: {sorted(nodes)}"
        assert saved == 2 * seq_len * per_token + cast_lora_weights, seq_len


def test_checkpointed_inputs_are_what_the_checkpointed_model_keeps():
    """Run the bf16 model with the trainer's per-layer checkpointing under an outer saved-tensors hook: the
    checkpoint saves each layer's input; everything saved inside a layer goes to its own hook instead (and is
    recomputed), so the outer hook must see the layer inputs and the final norm's tensors (the loss phase) and
    nothing else. RoPE's cos and sin are not saved tensors: each layer's call holds them (kwargs); they are
    sized here from the model's own rotary embedding."""
    from qlora_trainer.lora import apply_lora
    from qlora_trainer.training import enable_checkpointing

    model = small_model("bf16")
    apply_lora(model, "all-linear", r=8, dropout=0.05)
    enable_checkpointing(model)
    model.train()
    seq_len, h = 64, SMALL["hidden_size"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, SMALL["vocab_size"], (1, seq_len)), use_cache=False)
    kinds = sorted((tuple(t.shape), str(t.dtype)) for t in saved.values())
    layer_inputs = [t for t in saved.values() if t.dtype == torch.bfloat16]
    final_norm = [((1, seq_len, 1), "torch.float32"), ((1, seq_len, h), "torch.float32")]  # rsqrt, fp32 input
    assert kinds == sorted([((1, seq_len, h), "torch.bfloat16")] * SMALL["num_hidden_layers"] + final_norm)
    cos, sin = model.model.rotary_emb(layer_inputs[0], torch.arange(seq_len)[None])
    expected = estimate_memory(SMALL, RunSettings(seq_len=seq_len)).checkpointed_inputs
    assert expected == storage_bytes(layer_inputs) + storage_bytes([cos, sin])


# ------------------------------------------------------------------------------------------- Llama-3-8B facts


def test_llama3_8b_parameter_counts():
    """Public numbers, not the estimator's formulas: Llama-3-8B has 8,030,261,248 parameters, 6,979,321,856 of
    them in the decoder linears; LoRA r=16 on all linears trains 41,943,040 (PEFT's count)."""
    shape = shape_from_config(LLAMA3_8B)
    linear_params = shape.layers * sum(o * i for o, i in shape.linear_shapes().values())
    assert linear_params == 6_979_321_856
    b = estimate_memory(LLAMA3_8B, RunSettings(seq_len=2048, rank=16))
    assert linear_params + b.dense_weights // 2 == 8_030_261_248  # bf16 embeddings, lm_head, norms
    assert b.lora_param_count == 41_943_040
    assert b.lora_params == b.lora_grads == 4 * 41_943_040
    # the QLoRA paper's cost of double quantization: 8/64 + 32/(64*256) = 0.127 bits per parameter over the 4
    assert b.quantized_weights == pytest.approx(linear_params * (4 + 8 / 64 + 32 / (64 * 256)) / 8, rel=1e-4)


def test_breakdown_adds_up():
    """allocated counts every part once and only the larger of the two phases that never overlap."""
    for run in (RunSettings(seq_len=2048), RunSettings(seq_len=64, batch_size=2, loss_chunk_size=4096)):
        b = estimate_memory(LLAMA3_8B, run)
        parts = (b.quantized_weights + b.dense_weights + b.lora_params + b.lora_grads + b.optimizer_state
                 + b.checkpointed_inputs)
        assert b.allocated == parts + max(b.layer_recompute, b.loss_chunk)
        assert b.total == b.allocated + b.cuda_overhead > b.allocated


def test_nf4_bytes_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(128, 384, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    tensors = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert real == nf4_bytes(128 * 384) == 26448


@pytest.mark.parametrize("field", ["seq_len", "batch_size", "rank"])
def test_more_means_more_memory(field):
    base = RunSettings(seq_len=512, batch_size=2, rank=8)
    totals = [estimate_memory(LLAMA3_8B, RunSettings(**{**base.__dict__, field: v})).total for v in (4, 8, 16, 1024)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


@pytest.mark.parametrize("config", [LLAMA3_8B, TINY], ids=["llama3-8b", "tiny"])
def test_max_seq_len_is_the_boundary(config):
    run = RunSettings(batch_size=1)
    gpu_gib = 24.0 if config is LLAMA3_8B else 0.75
    t = max_seq_len_that_fits(gpu_gib, config, run)
    assert t > 0
    assert estimate_memory(config, RunSettings(seq_len=t)).total <= gpu_gib * GIB
    assert estimate_memory(config, RunSettings(seq_len=t + 1)).total > gpu_gib * GIB
    b = max_batch_that_fits(gpu_gib, config, RunSettings(seq_len=1024))
    assert estimate_memory(config, RunSettings(seq_len=1024, batch_size=b)).total <= gpu_gib * GIB
    assert estimate_memory(config, RunSettings(seq_len=1024, batch_size=b + 1)).total > gpu_gib * GIB


def test_nothing_fits_gives_zero():
    assert max_seq_len_that_fits(1.0, LLAMA3_8B) == 0
    assert max_batch_that_fits(1.0, LLAMA3_8B) == 0


# ----------------------------------------------------------------------------------------- input / CLI


def test_cli_prints_table_and_fits(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "4096", "--rank", "16"]) == 0  # DESIGN's flags
    out = capsys.readouterr().out
    assert "total (peak)" in out and "optimizer state (paged_adamw_8bit)" in out
    run = RunSettings(seq_len=4096, rank=16)
    assert f"seq len up to {max_seq_len_that_fits(80, LLAMA3_8B, run):,}" in out
    assert f"{estimate_memory(LLAMA3_8B, run).total / GIB:6.2f}" in out


def test_model_from_config_json_path_and_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert read_config_json(tmp_path / "config.json")[0] == TINY
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_config_json("org/tiny")[0] == TINY


@pytest.mark.parametrize("argv, names", [
    (["--model", "/models/llama3-70b"], "/models/llama3-70b"),
    (["--model", "MODEL", "--seq-len", "0"], "--seq-len"),
    (["--model", "MODEL", "--batch-size", "-1"], "--batch-size"),
    (["--model", "MODEL", "--rank", "0"], "--rank"),
    (["--model", "MODEL", "--gpu-gib", "0"], "--gpu-gib"),
    (["--model", "MODEL", "--targets", "qkv"], "--targets"),
    (["--model", "EMPTY"], "no config.json"),
    (["--model", "EMPTY/bad.json"], "bad.json"),
])
def test_bad_input_names_the_flag_or_file(tmp_path, capsys, argv, names):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.json").write_text("{not json")
    argv = [a.replace("MODEL", str(tmp_path / "m")).replace("EMPTY", str(tmp_path / "empty")) for a in argv]
    assert main(["estimate", *argv]) == 2
    assert re.search(names, capsys.readouterr().err)


@pytest.mark.parametrize("change, names", [
    ({"model_type": "gpt_bigcode"}, "model_type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_bad_config_names_the_key(change, names):
    with pytest.raises(UserError, match=names):
        shape_from_config({**TINY, **change}, "some/config.json")


def test_head_dim_and_kv_heads_defaults():
    shape = shape_from_config({k: v for k, v in TINY.items() if k != "num_key_value_heads"})
    assert (shape.head_dim, shape.kv_heads) == (32, 4)
    assert shape_from_config({**TINY, "head_dim": 64}).q_dim == 256


# ----------------------------------------------------------------------------------------- a training config

def _training_config(tmp_path, **changes) -> str:
    """A training YAML over a LLaMA-3-8B-shaped config.json, every setting estimate reads set away from its default."""
    model = tmp_path / "llama3-8b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    sections = {
        "model": {"path": str(model), "compute_dtype": "fp16"},
        "lora": {"r": 32, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]},
        "data": {"path": "unused.jsonl", "format": "alpaca", "max_seq_len": 3072},
        "train": {"batch_size": 3, "optimizer": "adamw", "loss_chunk_size": 512},
        "out": "runs/unused",
    }
    for key, value in changes.items():
        section, name = key.split(".")
        sections[section][name] = value
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(sections))
    return str(path)


EQUIVALENT_FLAGS = ["--seq-len", "3072", "--batch-size", "3", "--rank", "32", "--targets", "q_proj,v_proj,down_proj",
                    "--optimizer", "adamw", "--loss-chunk-size", "512", "--dtype", "fp16", "--lora-dropout", "0"]


def _estimate(capsys, *argv) -> str:
    assert main(["estimate", *argv]) == 0
    return capsys.readouterr().out


def test_cli_reads_a_training_config_and_prints_what_the_equivalent_flags_print(tmp_path, capsys):
    config = _training_config(tmp_path)
    from_config = _estimate(capsys, config)
    model = str(tmp_path / "llama3-8b")
    assert from_config == _estimate(capsys, "--model", model, *EQUIVALENT_FLAGS)
    assert from_config != _estimate(capsys, "--model", model)  # the config's settings are not the defaults
    assert "seq 3072 x batch 3, r 32 on 3 linears/layer" in from_config and "optimizer state (adamw)" in from_config
    # Flags and dotted overrides override the file; model.compute_dtype auto is a GPU's bf16.
    flags = [*EQUIVALENT_FLAGS[:-4], "--dtype", "bf16", "--lora-dropout", "0.1"]
    expected = _estimate(capsys, "--model", model, *flags)
    assert _estimate(capsys, config, "--dtype", "bf16", "--lora-dropout", "0.1") == expected
    assert _estimate(capsys, config, "model.compute_dtype=bf16", "lora.dropout=0.1") == expected
    assert _estimate(capsys, _training_config(tmp_path, **{"model.compute_dtype": "auto", "lora.dropout": 0.1})) \
        == expected
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": 16}))
    assert "16 layers" in _estimate(capsys, config, "--model", str(other))


@pytest.mark.parametrize("argv, message", [
    ([], r"needs a model: --model DIR .*or a training CONFIG\.yaml"),
    (["CONFIG", "model.path=MISSING"], r"run\.yaml: model\.path .*missing-model: no such folder"),
    (["CONFIG", "lora.targets=[c_attn]"], r"run\.yaml: lora\.targets: unknown or empty \['c_attn'\]"),
    (["CONFIG", "--targets", "qkv"], r"--targets: unknown"),
    (["CONFIG", "lora.rank=3"], r"unknown key 'lora\.rank'.*did you mean 'lora\.r'"),
    (["--model", "MODEL", "lora.r=3"], r"overrides \(lora\.r=3\) need a CONFIG\.yaml"),
])
def test_bad_config_input_is_one_line_naming_the_key_or_flag(tmp_path, capsys, argv, message):
    config = _training_config(tmp_path)
    argv = [a.replace("CONFIG", config).replace("MISSING", str(tmp_path / "missing-model"))
            .replace("MODEL", str(tmp_path / "llama3-8b")) for a in argv]
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_no_gradient_checkpointing_in_the_config_is_pointed_out(tmp_path, capsys):
    out = _estimate(capsys, _training_config(tmp_path, **{"train.gradient_checkpointing": False}))
    assert out.startswith("note: ") and "gradient_checkpointing false" in out.splitlines()[0]


def test_help_describes_the_command_and_every_option(capsys):
    from qlora_trainer.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    estimate = commands.choices["estimate"]
    assert estimate.description and "CONFIG.yaml" in estimate.description
    for action in estimate._actions:
        assert action.help and len(action.help) > 10, action.dest
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tokens per sequence (default: data.max_seq_len of CONFIG, else 2048)" in text
