"""Adapters in PEFT's layout, checked against PEFT itself in both directions, plus every way a folder can be bad."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from qlora_trainer import atomic
from qlora_trainer.adapter import (base_fingerprint, check_base_fingerprint, load_adapter_into, read_adapter,
                                   save_adapter)
from qlora_trainer.errors import UserError
from qlora_trainer.names import ADAPTER_CONFIG_FILE as CONFIG_FILE
from qlora_trainer.names import ADAPTER_RECORD_FILE as OURS_FILE
from qlora_trainer.names import ADAPTER_WEIGHTS_FILE as WEIGHTS_FILE
from qlora_trainer.loading import load_quantized, meta_model
from qlora_trainer.lora import apply_lora, lora_modules
from tests.helpers import (TINY, load_ours, random_ids, transformers_nf4, transformers_nf4_classifier,
                           write_tiny_llama)


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.05)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


def _save(model, out, **kwargs):
    return save_adapter(model, out, base_model_name_or_path="tiny-llama", **kwargs)


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """Our model with random A/B on every linear, saved; (model, adapter folder)."""
    model = load_ours(tiny_llama)
    apply_lora(model, "all-linear", r=8, alpha=16)
    _randomize(model)
    return model, _save(model, tmp_path_factory.mktemp("saved") / "adapter")


# ------------------------------------------------------------------------------------------ interop with PEFT

def test_ours_loads_in_peft_with_the_same_logits(tiny_llama, saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, OURS_FILE]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "Unexpected keyword arguments" for unknown keys
        config = LoraConfig.from_pretrained(folder)
    assert (config.r, config.lora_alpha, config.use_rslora, config.bias) == (8, 16, False, "none")
    ref = PeftModel.from_pretrained(transformers_nf4(tiny_llama), folder)
    ids = random_ids(model.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    fresh = load_ours(tiny_llama)  # and back into ours, bit for bit
    load_adapter_into(fresh, folder)
    for name, layer in lora_modules(model).items():
        assert torch.equal(lora_modules(fresh)[name].lora_A, layer.lora_A)
        assert torch.equal(lora_modules(fresh)[name].lora_B, layer.lora_B)


def test_config_and_tensors_are_in_peft_layout(tiny_llama, saved, tmp_path):
    model, folder = saved
    ours = json.loads((folder / CONFIG_FILE).read_text())
    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    peft_keys = set(json.loads((tmp_path / CONFIG_FILE).read_text()))
    assert set(ours) <= peft_keys and peft_keys - set(ours) <= {"peft_version"}
    assert ours["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (ours["peft_type"], ours["task_type"], ours["inference_mode"], ours["fan_in_fan_out"]) == \
        ("LORA", "CAUSAL_LM", True, False)
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, layer in lora_modules(model).items():
            A = f.get_tensor(f"base_model.model.{name}.lora_A.weight")
            B = f.get_tensor(f"base_model.model.{name}.lora_B.weight")
            assert A.dtype == B.dtype == torch.float32
            assert torch.equal(A, layer.lora_A) and torch.equal(B, layer.lora_B)
        assert len(list(f.keys())) == 2 * len(lora_modules(model))
    adapter = read_adapter(folder)
    assert adapter.scale == 2.0 and adapter.extra == {}
    assert adapter.fingerprint == base_fingerprint(meta_model(tiny_llama))
    assert adapter.compute_dtype == "fp32"


@pytest.mark.parametrize("r, targets, use_rslora", [(8, "all-linear", False), (8, ["q_proj", "v_proj"], True)])
def test_peft_adapter_loads_in_ours_with_the_same_logits(tiny_llama, tmp_path, r, targets, use_rslora):
    peft_model = get_peft_model(transformers_nf4(tiny_llama), LoraConfig(
        r=r, lora_alpha=16, lora_dropout=0.1, target_modules=targets, use_rslora=use_rslora, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()

    ours = load_ours(tiny_llama).eval()
    adapter = load_adapter_into(ours, tmp_path)
    assert adapter.fingerprint is None and adapter.scale == (16 / r ** 0.5 if use_rslora else 16 / r)
    n_per_layer = 7 if targets == "all-linear" else 2
    assert len(lora_modules(ours)) == n_per_layer * ours.config.num_hidden_layers
    ids = random_ids(ours.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_partly_wrapped_short_name_is_written_as_full_paths(tiny_llama, tmp_path):
    model = load_ours(tiny_llama)
    apply_lora(model, ["model.layers.1.self_attn.q_proj", "v_proj"], r=4, alpha=4)
    _randomize(model)
    folder = _save(model, tmp_path / "a")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj", "v_proj"]
    fresh = load_ours(tiny_llama)
    load_adapter_into(fresh, folder)
    assert set(lora_modules(fresh)) == set(lora_modules(model))


# ------------------------------------------------------------------------------------------ wrong base

@pytest.fixture(scope="module")
def small_adapter(tiny_llama, tmp_path_factory):
    """An adapter over the 2-layer tiny LLaMA; (base folder, adapter folder)."""
    root, base = tmp_path_factory.mktemp("small-adapter"), tiny_llama
    model = load_ours(base)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    _randomize(model)
    return base, save_adapter(model, root / "adapter", base_model_name_or_path=str(base))


def test_adapter_over_a_base_with_more_layers_is_refused(small_adapter, tmp_path):
    _, folder = small_adapter
    deeper = write_tiny_llama(tmp_path / "deeper", num_hidden_layers=3)
    message = rf"{folder / OURS_FILE}: .*different base.*num_hidden_layers=2 \(adapter\) vs 3"
    with pytest.raises(UserError, match=message):  # from the config alone (a meta-device model), as merge does
        check_base_fingerprint(read_adapter(folder), meta_model(deeper))
    other = load_ours(deeper)
    with pytest.raises(UserError, match=message):
        load_adapter_into(other, folder)
    assert not lora_modules(other)  # nothing was changed
    # Without the fingerprint check the shapes fit, but target_modules names layer 2, which has no weights.
    with pytest.raises(UserError, match=rf"{WEIGHTS_FILE}: no LoRA weights for model\.layers\.2\.self_attn\.q_proj"):
        load_adapter_into(other, folder, check_base=False)


def test_shape_mismatch_names_the_module(small_adapter, tmp_path):
    _, folder = small_adapter
    wider = load_ours(write_tiny_llama(tmp_path / "wider", hidden_size=192, intermediate_size=384))
    with pytest.raises(UserError, match=r"hidden_size=128 \(adapter\) vs 192"):
        load_adapter_into(wider, folder)
    with pytest.raises(UserError, match=rf"{WEIGHTS_FILE}: model\.layers\.0\.self_attn\.q_proj has lora_A \(4, 128\)"):
        load_adapter_into(wider, folder, check_base=False)
    # An adapter without our fingerprint (as PEFT writes it) is still checked shape by shape.
    copy = tmp_path / "peft-like"
    shutil.copytree(folder, copy)
    (copy / OURS_FILE).unlink()
    with pytest.raises(UserError, match=r"q_proj has lora_A \(4, 128\).*out=192, in=192"):
        load_adapter_into(wider, copy)


def test_tampered_fingerprint_shape_names_the_module(small_adapter, tmp_path):
    base, folder = small_adapter
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    ours = json.loads((copy / OURS_FILE).read_text())
    ours["base_fingerprint"]["modules"]["model.layers.1.mlp.up_proj"] = [999, 128]
    (copy / OURS_FILE).write_text(json.dumps(ours))
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj is \(999, 128\)"):
        load_adapter_into(load_ours(base), copy)


def test_missing_module_in_weights_is_named_when_loading(small_adapter, tmp_path):
    base, folder = small_adapter
    copy = tmp_path / "partial"
    shutil.copytree(folder, copy)
    tensors = safetensors.torch.load_file(copy / WEIGHTS_FILE)
    for half in ("lora_A", "lora_B"):
        del tensors[f"base_model.model.model.layers.1.self_attn.v_proj.{half}.weight"]
    safetensors.torch.save_file(tensors, copy / WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"no LoRA weights for model\.layers\.1\.self_attn\.v_proj"):
        load_adapter_into(load_ours(base), copy)


# ------------------------------------------------------------------------------------------ bad files

def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    tensors = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    safetensors.torch.save_file(tensors, folder / WEIGHTS_FILE)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
CORRUPTIONS = {
    "truncated": (WEIGHTS_FILE, "truncated or corrupt",
                  lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100])),
    "garbage": (WEIGHTS_FILE, "truncated or corrupt", lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 64)),
    "bad json": (CONFIG_FILE, "not valid JSON", lambda d: (d / CONFIG_FILE).write_text('{"r": 8,')),
    "no config": (CONFIG_FILE, "missing", lambda d: (d / CONFIG_FILE).unlink()),
    "no weights": (WEIGHTS_FILE, "missing", lambda d: (d / WEIGHTS_FILE).unlink()),
    "not lora": (CONFIG_FILE, "peft_type is 'LOHA'", lambda d: _edit_config(d, peft_type="LOHA")),
    "dora": (CONFIG_FILE, "use_dora is set", lambda d: _edit_config(d, use_dora=True)),
    "rank": (WEIGHTS_FILE, r"not rank r=4", lambda d: _edit_config(d, r=4)),
    "missing A": (WEIGHTS_FILE, r"q_proj has no lora_A\.weight",
                  lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_A.weight"))),
    "missing target": (WEIGHTS_FILE, r"no LoRA weights for target module 'q_proj'",
                       lambda d: _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if "q_proj" in k])),
    "extra key": (WEIGHTS_FILE, r"unexpected tensor 'base_model\.model\.lm_head\.weight'",
                  lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.weight": torch.ones(2)}))),
    "untargeted": (WEIGHTS_FILE, r"LoRA weights for model\.layers\.0\.mlp\.up_proj, which target_modules",
                   lambda d: _edit_config(d, target_modules=["down_proj", "gate_proj", "k_proj", "o_proj",
                                                             "q_proj", "v_proj"])),
    "nan": (WEIGHTS_FILE, r"q_proj\.lora_B\.weight holds NaN",
            lambda d: _edit_tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan")))),
    "bad fingerprint": (OURS_FILE, "malformed", lambda d: (d / OURS_FILE).write_text('{"base_fingerprint": 3}')),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_adapter_files_are_named(saved, tmp_path, case):
    file, message, corrupt = CORRUPTIONS[case]
    folder = shutil.copytree(saved[1], tmp_path / "adapter")
    corrupt(folder)
    with pytest.raises(UserError, match=rf"{folder / file}: .*{message}"):
        read_adapter(folder)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path / 'nope'}: no such folder"):
        read_adapter(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ atomic writes

def test_failed_save_keeps_the_previous_adapter_and_leaves_no_temp_folder(saved, tmp_path, monkeypatch):
    model, source = saved
    dest = shutil.copytree(source, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        _save(model, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize("exchange", [True, False])
def test_save_replaces_an_existing_adapter(saved, tmp_path, monkeypatch, exchange):
    model, source = saved
    dest = shutil.copytree(source, tmp_path / "adapter")
    (dest / "stale.txt").write_text("from the old adapter")
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _save(model, dest)
    assert sorted(p.name for p in dest.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, OURS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_refuses_to_replace_a_folder_that_is_not_an_adapter(saved, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="not an adapter folder; refusing to replace it"):
        _save(saved[0], tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# ------------------------------------------------------------------------------------------ classifier heads

def test_classifier_head_in_modules_to_save_goes_both_ways(tmp_path):
    # Tied embeddings: the checkpoint has no lm_head.weight (load_quantized(task="classification") refuses one).
    tied_base = write_tiny_llama(tmp_path / "base", tied=True)
    ref = transformers_nf4_classifier(tied_base, 3, pad_token_id=TINY["eos_token_id"])
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()

    ours = load_quantized(tied_base, compute_dtype="fp32", device="cpu", task="classification", num_labels=3,
                          progress=False)
    adapter = load_adapter_into(ours, tmp_path / "peft")
    assert list(adapter.extra) == ["score.weight"]
    ids = random_ids(ours.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    # Ours writes the head the way PEFT does, and reads it back.
    folder = save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(tied_base), task_type="SEQ_CLS",
                          modules_to_save=["classifier", "score"])
    back = read_adapter(folder)
    assert torch.equal(back.extra["score.weight"], ours.score.weight)
    assert set(safetensors.torch.load_file(folder / WEIGHTS_FILE)) == \
        set(safetensors.torch.load_file(tmp_path / "peft" / WEIGHTS_FILE))
