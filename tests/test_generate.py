"""Generation: greedy parity with transformers + bitsandbytes (+ PEFT), EOS, the chat template, sampling, the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from qlora_trainer.cli import main
from qlora_trainer.errors import UserError
from qlora_trainer.generate import (eos_ids, generate, generate_ids, load_for_generation, next_token,
                                    render_prompt)
from tests.helpers import ASSET, transformers_nf4, write_peft_adapter

PROMPT = "hello there"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSET)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return write_peft_adapter(ASSET, tmp_path_factory.mktemp("gen") / "adapter", seed=2, b_std=0.5)


@pytest.fixture(scope="module")
def base_model():
    return load_for_generation(ASSET, compute_dtype="fp32", device="cpu")[0]


def _reference_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """transformers' own generate, greedy; the new tokens up to (not including) the first EOS."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


def test_the_chat_template_renders_one_bos_and_the_assistant_header(tokenizer):
    ids = render_prompt(tokenizer, PROMPT)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    text = tokenizer.decode(ids)
    assert text.startswith("<s><|start_header_id|>user") and text.endswith("assistant<|end_header_id|>\n\n")
    assert render_prompt(tokenizer, PROMPT, chat=False) == tokenizer(PROMPT).input_ids  # plain: BOS + text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": PROMPT}]
    assert render_prompt(tokenizer, messages)[-len(ids) + 1:] == ids[1:]  # the last turn renders the same


def test_greedy_base_equals_transformers_and_stops_at_eos(base_model, tokenizer):
    ids = render_prompt(tokenizer, PROMPT)
    eos = tokenizer.eos_token_id
    ours = generate_ids(base_model, ids, max_new_tokens=16, eos=eos_ids(base_model, tokenizer))
    ref = _reference_greedy(transformers_nf4(ASSET), ids, 16, eos)
    assert ours == ref
    # The shipped tiny model is trained to answer and end its turn: EOS comes well before the limit.
    assert 0 < len(ours) < 16
    text = generate(base_model, tokenizer, PROMPT, max_new_tokens=16)
    assert text == tokenizer.decode(ours) and "</s>" not in text and text.strip()


def test_greedy_with_a_peft_adapter_equals_transformers_plus_peft(adapter, tokenizer):
    model, _ = load_for_generation(ASSET, adapter, compute_dtype="fp32", device="cpu")
    ids = render_prompt(tokenizer, PROMPT)
    eos = tokenizer.eos_token_id
    ref_model = PeftModel.from_pretrained(transformers_nf4(ASSET), adapter).eval()
    ours = generate_ids(model, ids, max_new_tokens=8, eos={eos})
    assert ours == _reference_greedy(ref_model, ids, 8, eos)
    base = load_for_generation(ASSET, compute_dtype="fp32", device="cpu")[0]
    assert ours != generate_ids(base, ids, max_new_tokens=8, eos={eos})  # the adapter changes the answer


def test_nothing_follows_when_the_greedy_token_is_eos(base_model, tokenizer):
    """Make the 3rd greedy token the model's EOS (generation_config): the reply is the first two tokens."""
    ids = render_prompt(tokenizer, PROMPT)
    free = generate_ids(base_model, ids, max_new_tokens=6, eos=set())
    assert len(free) == 6 and free[2] not in free[:2]
    saved = base_model.generation_config.eos_token_id
    try:
        base_model.generation_config.eos_token_id = [tokenizer.eos_token_id, free[2]]
        assert eos_ids(base_model, tokenizer) == {tokenizer.eos_token_id, free[2]}
        pieces = []
        text = generate(base_model, tokenizer, PROMPT, max_new_tokens=6, stream=pieces.append)
    finally:
        base_model.generation_config.eos_token_id = saved
    assert text == tokenizer.decode(free[:2], skip_special_tokens=True) == "".join(pieces)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])
    gen = torch.Generator().manual_seed(0)
    # top_p small: only the most likely token survives, whatever the temperature.
    assert {next_token(logits, temperature=5.0, top_p=0.1, generator=gen) for _ in range(50)} == {0}
    # top_p 0.9: the two near-equal tokens hold ~0.999 of the mass; the tail is cut.
    picks = {next_token(logits, temperature=1.0, top_p=0.9, generator=gen) for _ in range(200)}
    assert picks == {0, 1}
    assert next_token(logits, temperature=0.0, top_p=0.5, generator=None) == 0


def test_same_seed_same_sample(base_model, tokenizer):
    kwargs = dict(max_new_tokens=6, temperature=1.5, top_p=0.95)
    a = generate(base_model, tokenizer, PROMPT, seed=7, **kwargs)
    torch.manual_seed(123)  # the global RNG plays no part
    assert generate(base_model, tokenizer, PROMPT, seed=7, **kwargs) == a


def test_bad_options_and_no_template(base_model, tokenizer, tmp_path):
    with pytest.raises(UserError, match="temperature"):
        generate(base_model, tokenizer, PROMPT, temperature=-1)
    plain = AutoTokenizer.from_pretrained(ASSET)
    plain.chat_template = None
    assert render_prompt(plain, PROMPT) == plain(PROMPT).input_ids  # no template: plain text
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(plain, [{"role": "user", "content": PROMPT}])


def test_cli_prints_the_streamed_reply(capsys, base_model, tokenizer):
    expected = generate(base_model, tokenizer, PROMPT, max_new_tokens=12)
    code = main(["generate", "--base", str(ASSET), "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--dtype", "fp32", "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_keeps_the_conversation(capsys, monkeypatch, adapter, tokenizer):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nwhat is 2 + 3 ?\n\nnever read\n"))
    code = main(["generate", "--base", str(ASSET), "--adapter", str(adapter), "--chat", "--max-new-tokens", "4",
                 "--dtype", "fp32", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    model, _ = load_for_generation(ASSET, adapter, compute_dtype="fp32", device="cpu")
    first = generate(model, tokenizer, "hello there", max_new_tokens=4)
    second = generate(model, tokenizer, [{"role": "user", "content": "hello there"},
                                         {"role": "assistant", "content": first},
                                         {"role": "user", "content": "what is 2 + 3 ?"}], max_new_tokens=4)
    assert printed == f"{first}\n{second}\n"  # each reply streamed, then a newline


def test_cli_needs_a_prompt_or_chat(capsys):
    assert main(["generate", "--base", str(ASSET)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_cli_chat_no_history_answers_each_line_as_a_fresh_prompt(capsys, monkeypatch, adapter, tokenizer):
    common = ["generate", "--base", str(ASSET), "--adapter", str(adapter), "--max-new-tokens", "6", "--dtype", "fp32",
              "--device", "cpu"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nwhat is 2 + 3 ?\n\n"))
    assert main([*common, "--chat", "--no-history"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert main([*common, "--prompt", "hello there"]) == 0
    assert capsys.readouterr().out == first + "\n"
    assert main([*common, "--prompt", "what is 2 + 3 ?"]) == 0
    assert capsys.readouterr().out == second + "\n"  # the second line alone: what a fresh --prompt gives
    model, _ = load_for_generation(ASSET, adapter, compute_dtype="fp32", device="cpu")
    with_history = generate(model, tokenizer, [{"role": "user", "content": "hello there"},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": "what is 2 + 3 ?"}], max_new_tokens=6)
    assert with_history != second  # so the history would have shown (test_cli_chat_keeps_the_conversation)


def test_cli_chat_system_message_is_kept_without_history(capsys, monkeypatch, adapter, tokenizer):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhello there\n"))
    assert main(["generate", "--base", str(ASSET), "--adapter", str(adapter), "--chat", "--no-history", "--prompt",
                 "you are a cat", "--max-new-tokens", "6", "--dtype", "fp32", "--device", "cpu"]) == 0
    model, _ = load_for_generation(ASSET, adapter, compute_dtype="fp32", device="cpu")
    alone = generate(model, tokenizer, [{"role": "system", "content": "you are a cat"},
                                        {"role": "user", "content": "hello there"}], max_new_tokens=6)
    assert capsys.readouterr().out == f"{alone}\n{alone}\n"  # the same line twice: the same answer


def test_cli_chat_help_says_the_history_is_kept(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Each reply sees the whole conversation so far" in text and "--no-history" in text
    assert main(["generate", "--base", str(ASSET), "--prompt", "hi", "--no-history"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-history goes with --chat" in err


def test_stream_ending_mid_character_still_adds_up_to_the_reply(tokenizer):
    """A reply cut off inside a multi-byte character: the held-back bytes are emitted at the end, so what was
    streamed equals tokenizer.decode of the reply (the independent reference), replacement character included."""
    from qlora_trainer.generate import _TextStream
    ids = tokenizer.encode("é€😀", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    pieces = []
    stream = _TextStream(tokenizer, pieces.append)
    for token in ids[:cut]:
        stream(token)
    assert "\ufffd" not in "".join(pieces)  # held back while more bytes may come
    stream.finish()
    assert "".join(pieces) == tokenizer.decode(ids[:cut], skip_special_tokens=True)
    whole = []
    stream = _TextStream(tokenizer, whole.append)
    for token in ids:
        stream(token)
    stream.finish()
    assert "".join(whole) == "é€😀"
