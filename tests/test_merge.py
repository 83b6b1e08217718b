"""The streaming merge: fidelity against quantized base + adapter and a dense reference, layout, atomicity, memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_trainer import shards
from qlora_trainer.adapter import load_adapter_into
from qlora_trainer.cli import main
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.merge import merge
from qlora_trainer.verify import verify, verify_verdict
from tests.helpers import ASSET, REPO, TINY, logits_of, random_ids, write_peft_adapter, write_tiny_llama


def ours_with_adapter(base: Path, adapter: Path):
    model = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    load_adapter_into(model, adapter)
    return model


def _read_folder(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def adapter_all(tmp_path_factory) -> Path:
    return write_peft_adapter(ASSET, tmp_path_factory.mktemp("adapter") / "all")


@pytest.fixture(scope="module")
def adapter_qv(tmp_path_factory) -> Path:
    return write_peft_adapter(ASSET, tmp_path_factory.mktemp("adapter") / "qv", targets=["q_proj", "v_proj"],
                              use_rslora=True, seed=1)


@pytest.fixture(scope="module")
def merged_deq(tmp_path_factory, adapter_all) -> Path:
    out = tmp_path_factory.mktemp("merged") / "deq"
    return merge(ASSET, adapter_all, out, dtype="fp32", into="dequantized", compute_dtype="fp32",
                 max_shard_size="1MB", progress=False)


# ---------------------------------------------------------------------------------------- fidelity

@pytest.mark.parametrize("which", ["all-linear", "q,v + rslora"])
def test_dequantized_fp32_merge_gives_the_logits_of_quantized_base_plus_adapter(which, adapter_all, adapter_qv,
                                                                                 merged_deq, tmp_path):
    adapter = adapter_all if which == "all-linear" else adapter_qv
    out = merged_deq if which == "all-linear" else merge(ASSET, adapter, tmp_path / "m", dtype="fp32",
                                                         compute_dtype="fp32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    ours = ours_with_adapter(ASSET, adapter)
    ids = random_ids(ours.config.vocab_size, length=20)
    a, b = logits_of(ours, ids), logits_of(merged, ids)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # The adapter matters: the merged model is not just the base.
    base = load_quantized(ASSET, compute_dtype="fp32", device="cpu", progress=False)
    assert (logits_of(base, ids) - b).abs().max() > 1e-2


def test_original_merge_equals_a_dense_reference_merge(adapter_all, tmp_path):
    out = merge(ASSET, adapter_all, tmp_path / "orig", dtype="fp32", into="original", progress=False)
    merged = _read_folder(out)
    original = _read_folder(ASSET)
    config = json.loads((adapter_all / "adapter_config.json").read_text())
    lora = load_file(adapter_all / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    assert set(merged) == set(original)
    updated = 0
    for key, w in original.items():
        module = key.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        expected = w.float()
        if a_key in lora:  # independent formula: W + scale * B @ A, all fp32
            expected = expected + scale * (lora[a_key.replace("lora_A", "lora_B")].float() @ lora[a_key].float())
            updated += 1
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0)
    assert updated == 7 * 4


def test_verify_reports_fidelity_of_both_modes(adapter_all, merged_deq, tmp_path):
    deq = verify(ASSET, adapter_all, merged_deq, device="cpu")
    orig = verify(ASSET, adapter_all, merge(ASSET, adapter_all, tmp_path / "o", dtype="fp32", into="original",
                                            progress=False), device="cpu")
    assert deq["max_abs_diff"] < 1e-4 and deq["top1_agreement"] == 1.0
    assert orig["max_abs_diff"] > 10 * deq["max_abs_diff"]  # original weights differ from what was trained


def test_default_dtype_keeps_bf16_and_assumes_bf16_compute(adapter_all, tmp_path):
    out = merge(ASSET, adapter_all, tmp_path / "bf16", progress=False)
    merged = _read_folder(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = ours_with_adapter(ASSET, adapter_all)
    ids = random_ids(ours.config.vocab_size, length=20)
    a, b = logits_of(ours, ids), logits_of(model, ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # bf16 rounding of the merged weights only


# ---------------------------------------------------------------------------------------- layout

def test_folder_layout_index_and_side_files(merged_deq):
    index = json.loads((merged_deq / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in merged_deq.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(merged_deq / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert key not in seen, f"{key} in {seen.get(key)} and {shard}"
                seen[key] = shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
        assert (merged_deq / shard).stat().st_size <= 1_000_000 + 100_000  # --max-shard-size 1MB (+ header)
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert set(seen) == set(json.loads((ASSET / "model.safetensors.index.json").read_text())["weight_map"])
    config = json.loads((merged_deq / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    for name in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        assert (merged_deq / name).read_bytes() == (ASSET / name).read_bytes(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_deq)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<s>")
    assert not [p for p in merged_deq.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_tied_embeddings_stay_tied(tmp_path):
    base = write_tiny_llama(tmp_path / "tied", tied=True)
    adapter = write_peft_adapter(base, tmp_path / "adapter")
    out = merge(base, adapter, tmp_path / "out", dtype="fp32", compute_dtype="fp32", progress=False)
    assert set(_read_folder(out)) == set(_read_folder(base))  # lm_head is not written twice
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    ours = ours_with_adapter(base, adapter)
    ids = random_ids(TINY["vocab_size"], length=20)
    torch.testing.assert_close(logits_of(merged, ids), logits_of(ours, ids), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- errors, atomicity

def test_a_failure_midway_leaves_no_output_folder(adapter_all, tmp_path, monkeypatch):
    calls = []
    real = shards.ShardWriter.write

    def failing(self, key, tensor):
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(self, key, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        merge(ASSET, adapter_all, tmp_path / "out", max_shard_size="300KB", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_existing_output_is_refused_unless_empty(adapter_all, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        merge(ASSET, adapter_all, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        merge(ASSET, adapter_all, tmp_path / "file", progress=False)
    (tmp_path / "empty").mkdir()
    out = merge(ASSET, adapter_all, tmp_path / "empty", progress=False)
    assert (out / "model.safetensors.index.json").is_file()


def test_adapter_for_another_base_names_the_module(adapter_all, tmp_path):
    other = write_tiny_llama(tmp_path / "other", intermediate_size=256, num_hidden_layers=4, vocab_size=776)
    with pytest.raises(UserError, match=r"mlp\.(gate|up|down)_proj.*different base"):
        merge(other, adapter_all, tmp_path / "out", progress=False)
    shallow = write_tiny_llama(tmp_path / "shallow", num_hidden_layers=2, vocab_size=776)
    with pytest.raises(UserError, match=r"layers\.[23]\..*different base"):
        merge(shallow, adapter_all, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_files_are_named(adapter_all, tmp_path):
    with pytest.raises(UserError, match="no-such-adapter"):
        merge(ASSET, tmp_path / "no-such-adapter", tmp_path / "out", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter_all / "adapter_config.json").read_bytes())
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        merge(ASSET, broken, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="no-such-base"):
        merge(tmp_path / "no-such-base", adapter_all, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_merge_with_verify(adapter_all, tmp_path, capsys):
    code = main(["merge", "--base", str(ASSET), "--adapter", str(adapter_all), "--out", str(tmp_path / "m"),
                 "--dtype", "fp32", "--compute-dtype", "fp32", "--max-shard-size", "500KB", "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    match = re.search(r"max \|logit diff\| (\S+), mean (\S+), top-1 agreement (\S+)%", out)
    assert match and float(match[1]) < 1e-4 and float(match[3]) == 100.0, out
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) >= 3
    code = main(["merge", "--base", str(ASSET), "--adapter", str(adapter_all), "--out", str(tmp_path / "m")])
    assert code == 2 and "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- memory

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from qlora_trainer.merge import merge

    def hwm():  # peak resident set so far, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    import torch
    from qlora_trainer import quant
    from qlora_trainer.loading import meta_model

    # Imports and one-time set-up (kernels, the architecture's module) are not the merge: warm them first.
    meta_model(sys.argv[1])
    quant.quantize_dequantize(torch.randn(64, 64, dtype=torch.bfloat16))
    before = hwm()
    merge(sys.argv[1], sys.argv[2], sys.argv[3], compute_dtype="bf16", max_shard_size="40MB", progress=False)
    print(json.dumps({"before": before, "after": hwm()}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_peak_host_memory_is_about_one_tensor_not_the_model(tmp_path):
    """Merge a 41M-parameter checkpoint (82 MB in bf16, one file, 12 layers) with an all-linear adapter in a fresh
    process: the peak grows by about one tensor's temporaries, not by the model."""
    hidden, inter, layers, vocab, r = 512, 1536, 12, 2048, 8
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    linears = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        linears.update({p + "self_attn.q_proj": (hidden, hidden), p + "self_attn.k_proj": (hidden, hidden),
                        p + "self_attn.v_proj": (hidden, hidden), p + "self_attn.o_proj": (hidden, hidden),
                        p + "mlp.gate_proj": (inter, hidden), p + "mlp.up_proj": (inter, hidden),
                        p + "mlp.down_proj": (hidden, inter)})
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({k + ".weight": s for k, s in linears.items()})
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    model_bytes = sum(t.numel() * 2 for t in tensors.values())
    largest = max(t.numel() for t in tensors.values())
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config = {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora = {}
    for name, (out_f, in_f) in linears.items():
        lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
        lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0,
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         "use_rslora": False, "bias": "none", "base_model_name_or_path": str(base)}))
    adapter_bytes = sum(t.numel() * 4 for t in lora.values())

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(base), str(adapter), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = result["after"] - result["before"]
    # One tensor in flight: bf16 read, NF4 round trip and its fp32 copy, B @ A, bf16 output, allocator slack.
    one_tensor = largest * 32
    bound = adapter_bytes + one_tensor + 24 * 2**20  # + the meta model, python slack
    assert growth < bound, f"peak grew {growth / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert growth < 0.5 * model_bytes, f"peak grew {growth / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
    print(f"merge peak growth {growth / 2**20:.1f} MiB for a {model_bytes / 2**20:.0f} MiB model "
          f"(largest tensor {largest * 2 / 2**20:.0f} MiB in bf16)")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 3


# ---------------------------------------------------------------------------------------- our adapters, GPT-2

def _our_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    from qlora_trainer.adapter import save_adapter
    from qlora_trainer.lora import apply_lora, lora_modules

    model = load_quantized(base, compute_dtype="fp32", device="cpu", progress=False)
    apply_lora(model, r=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    save_adapter(model, out, base_model_name_or_path=str(base))
    return model


def test_our_adapter_over_a_base_with_another_fingerprint_is_refused(tiny_llama, tmp_path):
    _our_adapter(tiny_llama, tmp_path / "run" / "adapter")
    other = write_tiny_llama(tmp_path / "other", rms_norm_eps=1e-3)  # same shapes, different computation
    with pytest.raises(UserError, match="qlora_trainer.json.*different base.*rms_norm_eps"):
        merge(other, tmp_path / "run" / "adapter", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_compute_dtype_comes_from_the_runs_config_yaml(tiny_llama, tmp_path):
    trained = _our_adapter(tiny_llama, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text("model: {path: x, compute_dtype: fp32}\n")
    out = merge(tiny_llama, tmp_path / "run" / "adapter", tmp_path / "out", dtype="fp32", progress=False)
    explicit = merge(tiny_llama, tmp_path / "run" / "adapter", tmp_path / "out2", dtype="fp32", compute_dtype="fp32",
                     progress=False)
    merged = _read_folder(out)
    assert all(torch.equal(t, _read_folder(explicit)[k]) for k, t in merged.items())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = random_ids(TINY["vocab_size"], length=20)
    torch.testing.assert_close(logits_of(model, ids), logits_of(trained, ids), atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_weights_merge_in_their_own_layout(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2", max_shard_size="200KB")
    adapter = write_peft_adapter(tmp_path / "gpt2", tmp_path / "adapter", targets=["c_attn", "c_proj", "c_fc"])
    out = merge(tmp_path / "gpt2", adapter, tmp_path / "out", dtype="fp32", compute_dtype="fp32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = ours_with_adapter(tmp_path / "gpt2", adapter)
    ids = random_ids(256, length=20)
    torch.testing.assert_close(logits_of(merged, ids), logits_of(ours, ids), atol=1e-4, rtol=1e-4)


def test_python_callers_read_argument_names_and_the_cli_reads_flags(tmp_path, capsys):
    from qlora_trainer.estimate import RunSettings

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(UserError, match=r"out: out exists and is not empty") as raised:
        merge(ASSET, tmp_path / "no-adapter", tmp_path / "out", progress=False)
    assert "--out" not in str(raised.value)
    assert main(["merge", "--base", str(ASSET), "--adapter", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "out: --out exists and is not empty" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"^seq_len must be a positive integer, got 0$"):
        RunSettings(seq_len=0)
    assert main(["estimate", "--model", str(ASSET), "--seq-len", "0"]) == 2
    assert "error: --seq-len must be a positive integer, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the verdict

def _report(diff: float, top1: float = 1.0, dtype: str = "fp32") -> dict:
    return {"max_abs_diff": diff, "mean_abs_diff": diff / 10, "top1_agreement": top1, "positions": 100, "dtype": dtype}


@pytest.mark.parametrize("report, compute, passed, words", [
    (_report(5e-5), "fp32", True, "PASS (top-1 agreement >= 99% and max |logit diff| < 0.001 for fp32 rounding)"),
    (_report(0.04), "fp32", False, "FAIL: max |logit diff| 0.04 is not below 0.001"),
    (_report(0.04), "bf16", True, "PASS (top-1 agreement >= 95% and max |logit diff| < 0.5 for bf16 rounding)"),
    (_report(0.2, 0.97, "bf16"), "fp32", True, "for bf16 rounding"),
    (_report(0.05, 0.97, "fp16"), "fp32", False, "FAIL: top-1 agreement 97.0% is below 98%"),
    (_report(0.05, 0.99, "fp16"), "fp32", True, "< 0.1 for fp16 rounding"),
    (_report(0.6, 0.9, "bf16"), "bf16", False, "top-1 agreement 90.0% is below 95% and max |logit diff| 0.6 is not"),
    (_report(float("nan")), "fp32", False, "max |logit diff| nan is not below 0.001"),
])
def test_verdict_on_constructed_reports(report, compute, passed, words):
    verdict = verify_verdict(report, into="dequantized", compute_dtype=compute)
    assert verdict.passed is passed and words in verdict.line, verdict.line
    assert verdict.line.startswith("verify: PASS" if passed else "verify: FAIL")


def test_an_original_merge_gets_no_pass_or_fail():
    verdict = verify_verdict(_report(1.9, 0.87), into="original")
    assert verdict.passed is None and "no pass/fail for --into original" in verdict.line and "87.0%" in verdict.line


def _merge_cli(adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", "--base", str(ASSET), "--adapter", str(adapter), "--out", str(out), "--verify", "--quiet", *extra]


def test_cli_verify_passes_fp32_and_bf16_merges(adapter_all, tmp_path, capsys):
    assert main(_merge_cli(adapter_all, tmp_path / "fp32", "--dtype", "fp32", "--compute-dtype", "fp32")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("verify: PASS (top-1 agreement >= 99% and max |logit diff| "
                                                        "< 0.001 for fp32 rounding)")
    # The default: the checkpoint's bf16, and bf16 compute assumed for PEFT's adapter (no record of ours).
    assert main(_merge_cli(adapter_all, tmp_path / "bf16")) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verify: PASS (top-1 agreement >= 95%")


def test_cli_verify_fails_a_merge_that_lost_its_update_with_exit_code_1(adapter_all, tmp_path, capsys, monkeypatch):
    from qlora_trainer import merge as merge_module

    def without_update(weight, A, B, scale, **kwargs):  # a broken merge: the base weight as training saw it, no B @ A
        kwargs.pop("quantized", None)
        return merge_module.base_weight(weight, quantized=True, **kwargs)

    monkeypatch.setattr(merge_module, "merge_weight", without_update)
    code = main(_merge_cli(adapter_all, tmp_path / "broken", "--dtype", "fp32", "--compute-dtype", "fp32"))
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.splitlines()[-1].startswith("verify: FAIL: ") and "is not below 0.001" in out.splitlines()[-1]
    assert (tmp_path / "broken" / "config.json").is_file()  # the folder stays, to inspect


def test_cli_verify_of_an_original_merge_states_no_verdict(adapter_all, tmp_path, capsys):
    assert main(_merge_cli(adapter_all, tmp_path / "orig", "--into", "original", "--dtype", "fp32")) == 0
    assert "verify: no pass/fail for --into original" in capsys.readouterr().out


def test_merge_help_states_the_tolerances(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "top-1 agreement >= 99% and max |logit diff| < 0.001 (fp32)" in text and "(bf16)" in text
    assert "FAIL exits with code 1" in text and "--into original gets no pass/fail" in text


# ---------------------------------------------------------------------------------------- an unrecorded compute dtype

def _fp32_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="200KB")  # fp32, as GPT-2 checkpoints are
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    return folder


def test_a_peft_adapter_over_an_fp32_base_merges_in_fp32_and_says_it_assumed(tmp_path, capsys):
    """PEFT records no compute dtype: merge takes the base's config.json dtype (what transformers loaded and quantized
    it in, fp32 here), says so in one line naming --compute-dtype, and the merge equals an explicit fp32 one."""
    from qlora_trainer.merge import adapter_compute_dtype
    from qlora_trainer.adapter import read_adapter
    from qlora_trainer.base_model import resolve_base

    base = _fp32_gpt2(tmp_path / "gpt2")
    adapter = write_peft_adapter(base, tmp_path / "adapter", targets=["c_attn", "c_proj", "c_fc"])
    resolved = adapter_compute_dtype(read_adapter(adapter), adapter, resolve_base(base))
    assert (resolved.name, resolved.assumed) == ("fp32", True)
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--dtype", "fp32", "--quiet"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "compute dtype" in line]
    assert said == ["merge: the adapter records no compute dtype (no qlora_trainer.json, no run config.yaml); assumed "
                    "fp32, the dtype of the base's config.json (float32), which transformers loads and quantizes it "
                    "in by default: if training cast the base to another dtype before NF4, merge again with "
                    "--compute-dtype bf16|fp16|fp32"]
    explicit = merge(base, adapter, tmp_path / "explicit", dtype="fp32", compute_dtype="fp32", progress=False)
    merged = _read_folder(tmp_path / "out")
    assert merged.keys() == _read_folder(explicit).keys()
    assert all(torch.equal(t, _read_folder(explicit)[k]) for k, t in merged.items())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(256, length=20)
    torch.testing.assert_close(logits_of(model, ids), logits_of(ours_with_adapter(base, adapter), ids),
                               atol=1e-4, rtol=1e-4)


def test_without_a_dtype_in_the_base_config_the_assumption_is_bf16_and_said(tmp_path):
    from qlora_trainer.adapter import read_adapter
    from qlora_trainer.base_model import resolve_base
    from qlora_trainer.merge import ASSUMED_COMPUTE_DTYPE, adapter_compute_dtype

    base = _fp32_gpt2(tmp_path / "gpt2")
    adapter = write_peft_adapter(base, tmp_path / "adapter", targets=["c_attn"])
    config = json.loads((base / "config.json").read_text())
    del config["dtype"]
    (base / "config.json").write_text(json.dumps(config))
    resolved = adapter_compute_dtype(read_adapter(adapter), adapter, resolve_base(base))
    assert (resolved.name, resolved.assumed) == (ASSUMED_COMPUTE_DTYPE, True) and ASSUMED_COMPUTE_DTYPE == "bf16"
    assert "--compute-dtype" in resolved.assumed_line and "names no dtype" in resolved.assumed_line


def test_an_adapter_of_ours_records_its_dtype_and_merge_says_nothing_about_it(tiny_llama, tmp_path, capsys):
    _our_adapter(tiny_llama, tmp_path / "adapter")  # qlora_trainer.json: fp32; the base's config.json says bf16
    capsys.readouterr()
    assert main(["merge", "--base", str(tiny_llama), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "compute dtype" not in out and "--compute-dtype" not in out, out
    explicit = merge(tiny_llama, tmp_path / "adapter", tmp_path / "explicit", compute_dtype="fp32", progress=False)
    assert all(torch.equal(t, _read_folder(explicit)[k]) for k, t in _read_folder(tmp_path / "out").items())
