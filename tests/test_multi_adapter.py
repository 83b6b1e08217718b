"""Many adapters in one batch: each row of a mixed batch gives what its adapter gives alone, base rows what the bare
base gives; the batched decode and `generate --prompts` give each row what single-adapter generation gives it."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.adapter import load_adapter_into, save_adapter
from qlora_trainer.cli import main
from qlora_trainer.errors import UserError
from qlora_trainer.generate import generate, load_for_generation
from qlora_trainer.lora import apply_lora, lora_modules
from qlora_trainer.multi_adapter import MultiLoRALinear, load_adapters_into
from tests.helpers import ASSET, load_ours

ROWS = ["a", None, "b", "a", "c", None]


def _unwrap(model):
    """Back to the bare base: each LoRALinear replaced by the linear it wraps (one load serves many adapters)."""
    for name, layer in lora_modules(model).items():
        model.set_submodule(name, layer.base)
    return model


def _write_adapters(model, out, specs):
    """{name: folder} of random adapters (B non-zero) saved from `model`, which is left bare."""
    folders = {}
    for seed, (name, r, alpha, targets, rslora, std) in enumerate(specs):
        apply_lora(model, targets, r=r, alpha=alpha, use_rslora=rslora)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * std)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)
        folders[name] = save_adapter(model, out / name, base_model_name_or_path="t")
        _unwrap(model)
    return folders


def test_mixed_batch_equals_each_adapter_alone_and_base_rows_the_bare_base(tiny_llama, tmp_path):
    single = load_ours(tiny_llama)
    adapters = _write_adapters(single, tmp_path, [("a", 8, 16, "all-linear", False, 0.1),  # ranks, alphas,
                                                  ("b", 4, 8, ["q_proj", "v_proj"], False, 0.1),  # rsLoRA and
                                                  ("c", 2, 4, ["down_proj", "o_proj"], True, 0.1)])  # targets differ
    ids = torch.randint(0, 256, (len(ROWS), 12), generator=torch.Generator().manual_seed(3))  # (B, T)
    with torch.no_grad():
        expected = {None: single(ids).logits}
        for name, folder in adapters.items():
            load_adapter_into(single, folder)
            expected[name] = single(ids).logits
            _unwrap(single)

    model = load_ours(tiny_llama)
    routing = load_adapters_into(model, adapters)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), MultiLoRALinear)
    routing.set_rows(ROWS)
    with torch.no_grad():
        mixed = model(ids).logits  # (B, T, V)
    for row, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)
        if name is not None:  # each adapter changes its rows: the comparison could fail
            assert (expected[name][row] - expected[None][row]).abs().max() > 1e-2
    routing.set_rows([None] * len(ROWS))  # no adapter anywhere: the bare base
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected[None], rtol=1e-5, atol=1e-5)
    routing.set_rows(["b"] * 2)
    with pytest.raises(ValueError, match="routed for 2"):
        model(ids)
    with pytest.raises(UserError, match="no adapter named z"):
        routing.set_rows(["a", "z"])


def test_generate_prompts_gives_each_row_its_single_adapter_reply(tmp_path, capsys):
    """Prompts of different lengths (left padding), rows of two adapters and the base, batches of 3 of 5 rows."""
    model, tokenizer = load_for_generation(ASSET, compute_dtype="fp32", device="cpu")
    folders = _write_adapters(model, tmp_path, [("one", 8, 16, "all-linear", False, 0.3),
                                                ("two", 4, 8, ["q_proj", "up_proj"], False, 0.5)])
    rows = [{"prompt": "hello there", "adapter": "one"}, {"prompt": "reverse: c a t s", "adapter": None},
            {"prompt": "hi", "adapter": "two"}, {"prompt": "what is 2 + 3 ?", "adapter": "one", "id": 7},
            {"prompt": "reverse: a b", "adapter": "two"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = main(["generate", "--base", str(ASSET), "--adapter", f"one={folders['one']}", "--adapter",
                 f"two={folders['two']}", "--prompts", str(prompts), "--batch-size", "3", "--max-new-tokens", "8",
                 "--dtype", "fp32", "--device", "cpu"])
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{k: v for k, v in p.items() if k != "completion"} for p in printed] == rows
    replies = {}  # each row's prompt alone under its adapter, and "hello there" under all three
    for name in (None, "one", "two"):
        if name is not None:
            load_adapter_into(model, folders[name])
        for prompt in {row["prompt"] for row in rows if row["adapter"] == name} | {"hello there"}:
            replies[name, prompt] = generate(model, tokenizer, prompt, max_new_tokens=8)
        _unwrap(model)
    for row, out in zip(rows, printed):
        assert out["completion"] == replies[row["adapter"], row["prompt"]]
    # The adapters change the replies: the comparison could fail.
    assert len({replies[name, "hello there"] for name in (None, "one", "two")}) == 3


def test_prompt_rows_and_adapter_names_are_checked(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "adapter": "nope"}\n')
    args = ["generate", "--base", str(ASSET), "--prompts", str(prompts), "--device", "cpu"]
    assert main(args + ["--adapter", f"a={tmp_path}"]) == 2
    assert "p.jsonl:1: adapter 'nope' is not one of" in capsys.readouterr().err
    assert main(args + ["--adapter", str(tmp_path)]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["generate", "--base", str(ASSET), "--adapter", "x", "--adapter", "y", "--prompt", "hi"]) == 2
    assert "need --prompts" in capsys.readouterr().err
