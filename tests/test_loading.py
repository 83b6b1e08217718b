"""The streaming NF4 loader against transformers' own bitsandbytes load, its memory bound and its errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_trainer import quant
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized, random_quantized
from tests.helpers import REPO, TINY, transformers_nf4, write_tiny_llama


def _nf4_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if quant.is_nf4_linear(m)}


@pytest.mark.parametrize("variant", ["sharded", "single-file", "tied"])
def test_packed_weights_and_logits_equal_transformers(tmp_path, variant):
    path = write_tiny_llama(tmp_path, tied=variant == "tied", shard_size=None if variant == "single-file" else "150KB")
    if variant == "single-file":
        assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    else:
        assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
        assert len(list(path.glob("model-*.safetensors"))) >= 2

    ours = load_quantized(path, compute_dtype="fp32", device="cpu", progress=False)
    ref = transformers_nf4(path)

    ours_layers, ref_layers = _nf4_layers(ours), _nf4_layers(ref)
    assert set(ours_layers) == set(ref_layers)  # the same layers are quantized (all linears, not lm_head)
    assert "lm_head" not in ours_layers and len(ours_layers) == 7 * TINY["num_hidden_layers"]
    for name, layer in ours_layers.items():
        theirs = ref_layers[name].weight
        assert torch.equal(layer.weight.data, theirs.data), name
        ours_state, their_state = layer.weight.quant_state.as_dict(packed=True), theirs.quant_state.as_dict(packed=True)
        assert ours_state.keys() == their_state.keys()
        for key in ours_state:
            assert torch.equal(ours_state[key], their_state[key]), (name, key)

    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    if variant == "tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_dequantized_weights_are_close_to_the_checkpoint(tiny_llama):
    """NF4 is lossy but close: each dequantized weight is within the NF4 step of the bf16 original, and it is
    exactly what bitsandbytes' own quantize/dequantize round trip of that original gives."""
    import bitsandbytes.functional as F

    # Each value is stored as its nearest NF4 level times its block's absmax a, so it is off by at most half the
    # widest gap between neighbouring levels times a (0.152 a: the gap between -1 and -0.696). The absmax itself
    # is stored 8-bit quantized (double quantization) as a': x' = level * a' adds at most |level| |a' - a| <= |a' - a|.
    levels = F.get_4bit_type("nf4", device="cpu").sort().values  # (16,) in [-1, 1]
    half_gap = float(levels.diff().max()) / 2
    assert 0.15 < half_gap < 0.16
    model = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    originals = {}
    for shard in tiny_llama.glob("model-*.safetensors"):
        originals.update(load_file(shard))
    for name, layer in _nf4_layers(model).items():
        w = originals[name + ".weight"].float()
        dequantized = quant.dequantize(layer)
        err = (dequantized - w).abs()
        # NF4's widest gap between levels is about 0.34 of the block absmax; error is at most half of it
        block_absmax = w.reshape(-1, quant.BLOCKSIZE).abs().amax(1, keepdim=True)
        assert (err.reshape(-1, quant.BLOCKSIZE) <= 0.17 * block_absmax + 1e-6).all(), name
        state = layer.weight.quant_state
        stored_absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).reshape(-1, 1)
        bound = half_gap * block_absmax + (stored_absmax - block_absmax).abs()  # (blocks, 1)
        assert (err.reshape(-1, quant.BLOCKSIZE) <= bound * (1 + 1e-6)).all(), name
        packed, their_state = F.quantize_4bit(w, blocksize=quant.BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        assert torch.equal(dequantized, F.dequantize_4bit(packed, their_state)), name


def test_non_linear_weights_keep_full_precision(tiny_llama):
    model = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    originals = {}
    for shard in tiny_llama.glob("model-*.safetensors"):
        originals.update(load_file(shard))
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.post_attention_layernorm.weight"]:
        param = model.get_parameter(name)
        assert param.dtype == torch.float32 and not param.requires_grad
        assert torch.equal(param, originals[name].float())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from qlora_trainer import quant
    from qlora_trainer.loading import load_quantized

    def hwm():  # peak resident set so far, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    before = hwm()  # imports done; the checkpoint is not touched yet
    model = load_quantized(sys.argv[1], compute_dtype="fp32", device="cpu", progress=False)
    after = hwm()
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if type(p).__name__ != "Params4bit")
    held += sum(quant.quantized_bytes(m) for m in model.modules() if quant.is_nf4_linear(m))
    print(json.dumps({"before": before, "after": after, "model_bytes": held}))
""")


def _write_llama_checkpoint(folder: Path, layers: int, hidden: int = 1024, inter: int = 4096,
                            vocab: int = 1024) -> dict:
    """A random bf16 LLaMA checkpoint written tensor by tensor (no model object); returns its sizes."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    return {"bf16_bytes": sum(t.numel() * 2 for t in tensors.values()),
            "largest": max(t.numel() for t in tensors.values())}


def _peak_growth(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder)], capture_output=True, text=True,
                         cwd=REPO, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"growth": result["after"] - result["before"], "model_bytes": result["model_bytes"]}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_peak_host_memory_is_one_tensor_plus_the_quantized_model(tmp_path):
    """Peak RSS of a fresh process loading a 2-layer and a 10-layer checkpoint (50 MB and 185 MB in bf16)."""
    small = {**_write_llama_checkpoint(tmp_path / "small", layers=2), **_peak_growth(tmp_path / "small")}
    big = {**_write_llama_checkpoint(tmp_path / "big", layers=10), **_peak_growth(tmp_path / "big")}
    mib = 2**20
    for run in (small, big):
        assert run["model_bytes"] < 0.5 * run["bf16_bytes"]
        # The quantized model, one tensor in flight (bf16 read + fp32 chunks + bitsandbytes' temporaries), and a
        # fixed allowance for the allocator and the CPU kernels' first use (measured: 60-85 MiB at any size).
        bound = run["model_bytes"] + 10 * run["largest"] + 64 * mib
        assert run["growth"] < bound, f"peak grew {run['growth'] / mib:.0f} MiB > bound {bound / mib:.0f} MiB"
    # What eight more layers cost is their quantized size, not their bf16 size.
    extra_model = big["model_bytes"] - small["model_bytes"]
    extra_bf16 = big["bf16_bytes"] - small["bf16_bytes"]
    extra_growth = big["growth"] - small["growth"]
    assert extra_growth < 1.25 * extra_model + 16 * mib, (extra_growth / mib, extra_model / mib)
    assert extra_growth < 0.4 * extra_bf16


def test_random_weight_path_builds_straight_into_nf4():
    from transformers import LlamaConfig

    config = LlamaConfig(**TINY)
    model = random_quantized(config, compute_dtype="fp32", device="cpu", progress=False)
    assert all(p.device.type != "meta" for p in model.parameters())
    assert len(_nf4_layers(model)) == 7 * TINY["num_hidden_layers"]
    w = quant.dequantize(model.model.layers[0].mlp.up_proj)
    assert w.shape == (TINY["intermediate_size"], TINY["hidden_size"]) and 0.01 < w.std() < 0.03
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, TINY["vocab_size"]) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------- clear errors

def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _shard_holding(path: Path, key: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def _rewrite_shard(shard: Path, change) -> None:
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_tensor_names_it(tiny_llama, tmp_path):
    path = _copy_model(tiny_llama, tmp_path / "m")
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_shard(_shard_holding(path, key), lambda t: t.pop(key))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_quantized(path, device="cpu", progress=False)


def test_unexpected_and_misshaped_tensors_name_file_and_key(tiny_llama, tmp_path):
    path = _copy_model(tiny_llama, tmp_path / "m")
    key = "model.layers.0.self_attn.k_proj.weight"
    shard = _shard_holding(path, key)
    _rewrite_shard(shard, lambda t: t.update({key: torch.zeros(64, 64, dtype=torch.bfloat16)}))
    with pytest.raises(UserError, match=rf"{shard.name}.*{key}.*shape \(64, 64\).*\(64, 128\)"):
        load_quantized(path, device="cpu", progress=False)

    path2 = _copy_model(tiny_llama, tmp_path / "m2")
    shard2 = _shard_holding(path2, key)
    _rewrite_shard(shard2, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(4)}))
    index = json.loads((path2 / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = shard2.name
    (path2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"{shard2.name}.*unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_quantized(path2, device="cpu", progress=False)


def test_truncated_shard_names_the_file(tiny_llama, tmp_path):
    path = _copy_model(tiny_llama, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=shard.name):
        load_quantized(path, device="cpu", progress=False)


def test_folder_errors(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_quantized(tmp_path / "does-not-exist", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_quantized(tmp_path / "empty", device="cpu")
    path = _copy_model(tiny_llama, tmp_path / "noweights")
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        load_quantized(path, device="cpu")


def test_missing_hub_model_names_the_download_command_the_installed_hub_provides(tmp_path, monkeypatch):
    import importlib.metadata

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    installed = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points}
    assert "hf" in installed and "huggingface-cli" not in installed  # huggingface_hub >= 1.0, as pinned here
    with pytest.raises(UserError) as err:
        load_quantized("org/missing", device="cpu")
    message = str(err.value)
    assert "not a model in the local Hugging Face cache" in message and str(tmp_path / "hub") in message
    assert "nothing is downloaded at run time" in message and "`hf download org/missing`" in message
    assert "huggingface-cli" not in message

    class OldHub:  # huggingface_hub < 0.34 shipped only huggingface-cli
        entry_points = [importlib.metadata.EntryPoint("huggingface-cli", "x:main", "console_scripts")]

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: OldHub)
    with pytest.raises(UserError, match="`huggingface-cli download org/missing`"):
        load_quantized("org/missing", device="cpu")
    with pytest.raises(UserError) as err:  # not a hub id: no download advice
        load_quantized(tmp_path / "no" / "such" / "model", device="cpu")
    assert "no such folder" in str(err.value) and "download" not in str(err.value)


def test_unsupported_architecture_and_remote_code(tiny_llama, tmp_path):
    path = _copy_model(tiny_llama, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    with pytest.raises(UserError, match=r"config\.json.*unsupported architecture.*no-such-arch"):
        load_quantized(path, device="cpu")
    remote = {**config, "model_type": "my-custom", "auto_map": {"AutoModelForCausalLM": "modeling_x.MyModel"}}
    (path / "config.json").write_text(json.dumps(remote))
    with pytest.raises(UserError, match="trust_remote_code"):
        load_quantized(path, device="cpu")


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_that_escapes_the_folder_is_refused(tiny_llama, tmp_path, shard_name):
    path = _copy_model(tiny_llama, tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard_name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside the model folder"):
        load_quantized(path, device="cpu")


def test_a_width_that_is_not_a_multiple_of_the_nf4_block_is_one_clear_error(tmp_path, capsys):
    from qlora_trainer.cli import main

    folder = write_tiny_llama(tmp_path / "odd", hidden_size=96, intermediate_size=192, shard_size=None)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj takes 96 input features, not a multiple "
                                        r"of the NF4 blocksize 64"):
        load_quantized(folder, compute_dtype="fp32", device="cpu", progress=False)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["summary", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_random_weights_keep_tied_embeddings_tied_and_count_every_quantized_byte():
    from transformers import LlamaConfig

    config = LlamaConfig(**{**TINY, "num_hidden_layers": 1}, tie_word_embeddings=True)
    model = random_quantized(config, compute_dtype="fp32", device="cpu", progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one tensor, as a tied checkpoint loads
    layer = model.model.layers[0].self_attn.q_proj
    held, states = [layer.weight.data], [layer.weight.quant_state]
    while states:  # walk bitsandbytes' QuantState (and its nested one) for every tensor it holds, not by name
        for value in vars(states.pop()).values():
            held += [value] if torch.is_tensor(value) else []
            states += [value] if type(value) is type(layer.weight.quant_state) else []
    assert len(held) == 6  # packed codes, absmax, code table; offset, nested absmax, nested code table
    assert quant.quantized_bytes(layer) == sum(t.numel() * t.element_size() for t in held)


# ------------------------------------------------------------------------------------------ model.attn_implementation

GEMMA2 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, vocab_size=256, max_position_embeddings=128, sliding_window=16, bos_token_id=1,
              eos_token_id=2, pad_token_id=3)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """A random tiny Gemma 2 (bf16, with the word-level tokenizer): transformers 5 has no sdpa attention for it
    (Gemma2PreTrainedModel._supports_sdpa is False: sdpa cannot apply its logit softcapping)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tests.helpers import make_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(**GEMMA2)).to(torch.bfloat16)
    assert not model._supports_sdpa  # else this test needs another architecture without sdpa
    folder = tmp_path_factory.mktemp("gemma2") / "m"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_auto_attention_falls_back_to_eager_where_there_is_no_sdpa_and_matches_transformers(tiny_gemma2, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="qlora_trainer.loading"):
        ours = load_quantized(tiny_gemma2, compute_dtype="fp32", device="cpu", progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == "qlora_trainer.loading"]
    assert said == ["attention: eager (model.attn_implementation=auto: transformers has no sdpa attention for "
                    "Gemma2ForCausalLM)"]
    ref = transformers_nf4(tiny_gemma2)  # transformers' own default for Gemma 2: eager
    assert ours.config._attn_implementation == ref.config._attn_implementation == "eager"
    from qlora_trainer.loading import load_info
    assert load_info(ours).attn_implementation == "eager"
    ids = torch.randint(0, GEMMA2["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    explicit = load_quantized(tiny_gemma2, compute_dtype="fp32", device="cpu", progress=False,
                              attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(explicit(ids).logits, ref(ids).logits)


def test_auto_keeps_sdpa_where_the_architecture_has_it_and_says_nothing(tiny_llama, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="qlora_trainer.loading"):
        model = load_quantized(tiny_llama, compute_dtype="fp32", device="cpu", progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert not [r for r in caplog.records if r.name == "qlora_trainer.loading"]


ATTN_ERRORS = {
    "sdpa": r"^model\.attn_implementation=sdpa: Gemma2ForCausalLM does not support an attention implementation "
            r"through torch\.nn\.functional\.scaled_dot_product_attention yet; use model\.attn_implementation=auto "
            r"\(it picks eager for Gemma2ForCausalLM\) or eager$",
    "flash_attention_2": r"^model\.attn_implementation=flash_attention_2 needs a CUDA GPU, and this model is loaded on "
                         r"cpu: use model\.attn_implementation=auto",
}


@pytest.mark.parametrize("attn", list(ATTN_ERRORS))
def test_an_attention_the_model_or_machine_cannot_run_is_one_clear_error(tiny_gemma2, tmp_path, capsys, attn):
    from qlora_trainer.cli import main

    with pytest.raises(UserError, match=ATTN_ERRORS[attn]):
        load_quantized(tiny_gemma2, compute_dtype="fp32", device="cpu", progress=False, attn_implementation=attn)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": "the cat sat . the dog ran ."}) + "\n" for _ in range(8)))
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {{path: {tiny_gemma2}}}\ndata: {{path: {rows}, format: text, max_seq_len: 16}}\n"
                      f"out: {tmp_path / 'run'}\ntrain: {{max_steps: 1, grad_accum: 1, optimizer: adamw}}\n")
    capsys.readouterr()
    assert main(["train", str(config), f"model.attn_implementation={attn}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(ATTN_ERRORS[attn].lstrip("^"), err.removeprefix("error: ").strip()), err


def test_flash_attention_on_a_gpu_without_the_flash_attn_package_is_one_clear_error(tiny_gemma2):
    """What the machine cannot run past the device check: build_empty_model asks transformers, which needs the
    flash_attn package (not installed here; on a machine that has it, this test has nothing to check)."""
    from transformers import AutoConfig
    from transformers.utils import is_flash_attn_2_available

    from qlora_trainer.loading import build_empty_model

    if is_flash_attn_2_available():
        pytest.skip("flash_attn is installed here")
    with pytest.raises(UserError, match=r"^model\.attn_implementation=flash_attention_2: FlashAttention2 has been "
                                        r"toggled on, but it cannot be used .*the package for FlashAttention2 doesn't "
                                        r"seem to be installed; use model\.attn_implementation=auto \(it picks eager"):
        build_empty_model(AutoConfig.from_pretrained(tiny_gemma2), attn_implementation="flash_attention_2")


def test_training_gemma2_with_auto_attention_says_it_uses_eager(tiny_gemma2, tmp_path, capsys):
    from qlora_trainer.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": "the cat sat . the dog ran ."}) + "\n" for _ in range(8)))
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {{path: {tiny_gemma2}}}\ndata: {{path: {rows}, format: text, max_seq_len: 16, "
                      f"eval_fraction: 0}}\nout: {tmp_path / 'run'}\n"
                      "train: {max_steps: 1, grad_accum: 1, optimizer: adamw, save_every: 1}\n")
    capsys.readouterr()
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("attention: eager (model.attn_implementation=auto: transformers has no sdpa attention for "
                     "Gemma2ForCausalLM)") == 1, out
