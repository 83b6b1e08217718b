"""Data: formats and their label masks against hand-written ids, EOS trained / BOS not doubled, truncation and
drops, files and row errors, eval split, classification labels, packing (checked through a real transformers
Llama with sdpa and eager attention), collation and the preview."""

import json

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.config import DataConfig
from qlora_trainer.data import (build_datasets, collate, load_rows, pack, preview,
                                tokenize_row)
from qlora_trainer.errors import UserError
from qlora_trainer.names import IGNORE_INDEX
from tests.helpers import CHAT_TEMPLATE, ids, make_tokenizer

X = IGNORE_INDEX
ALPACA_PROMPT = ("Below is an instruction that describes a task . Write a response that appropriately completes "
                 "the request . ### Instruction : {} ### Response :")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task , paired with an input that provides further "
                       "context . Write a response that appropriately completes the request . ### Instruction : {} "
                       "### Input : {} ### Response :")


def cfg(fmt, **kw):
    return DataConfig(path="unused.jsonl", format=fmt, **kw)


def tokenize(row, fmt, tokenizer, **kw):
    example, truncated = tokenize_row(row, cfg(fmt, **kw), tokenizer)
    return example, truncated


def masked(prompt: str) -> list[int]:
    return [X] * len(prompt.split())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


CHAT = {"messages": [
    {"role": "system", "content": "a"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "what is 2 + 3 ?"},
    {"role": "assistant", "content": "5"},
]}


# ---------------------------------------------------------------------------------------- formats and masks

def test_text_format_trains_everything_after_bos_and_the_eos(tok):
    ex, truncated = tokenize({"text": "the cat sat"}, "text", tok)
    assert ex["input_ids"] == ids("<s> the cat sat </s>")
    assert ex["labels"] == [X] + ids("the cat sat </s>")
    assert not truncated


def test_text_format_without_bos_tokenizer_adds_none_and_still_ends_with_trained_eos(tok_pad_eos):
    ex, _ = tokenize({"text": "the cat sat"}, "text", tok_pad_eos)
    assert ex["input_ids"] == ids("the cat sat </s>")
    assert ex["labels"] == [X] + ids("cat sat </s>")  # the first token is never a target


def test_text_already_starting_with_bos_gets_no_second_bos(tok):
    ex, _ = tokenize({"text": "<s> the cat"}, "text", tok)
    assert ex["input_ids"] == ids("<s> the cat </s>")


@pytest.mark.parametrize("row, prompt, response", [
    ({"instruction": "what is 2 + 3 ?", "output": "5"}, ALPACA_PROMPT.format("what is 2 + 3 ?"), "5"),
    ({"instruction": "what is 2 + 3 ?", "input": "", "output": "5"}, ALPACA_PROMPT.format("what is 2 + 3 ?"), "5"),
    ({"instruction": "what is", "input": "2 + 3", "output": "5 ok"}, ALPACA_PROMPT_INPUT.format("what is", "2 + 3"),
     "5 ok"),
])
def test_alpaca_masks_the_prompt(tok, row, prompt, response):
    ex, _ = tokenize(row, "alpaca", tok)
    assert ex["input_ids"] == ids(f"<s> {prompt} {response} </s>")
    assert ex["labels"] == [X] + masked(prompt) + ids(f"{response} </s>")


def test_completion_masks_the_prompt(tok):
    ex, _ = tokenize({"prompt": "what is 2 + 3 ?", "completion": " 5"}, "completion", tok)
    assert ex["input_ids"] == ids("<s> what is 2 + 3 ? 5 </s>")
    assert ex["labels"] == [X, X, X, X, X, X, X] + ids("5 </s>")


def test_train_on_prompt_trains_all_but_the_first_token(tok):
    ex, _ = tokenize({"prompt": "what is", "completion": " 5"}, "completion", tok, train_on_prompt=True)
    assert ex["labels"] == [X] + ids("what is 5 </s>")


def test_chat_trains_each_assistant_content_and_end_marker_and_keeps_one_bos(tok):
    ex, _ = tokenize(CHAT, "chat", tok)
    expected = ("<s> <|start|> system <|sep|> a <|end|> <|start|> user <|sep|> hi <|end|> "
                "<|start|> assistant <|sep|> hello there </s> "
                "<|start|> user <|sep|> what is 2 + 3 ? <|end|> <|start|> assistant <|sep|> 5 </s>")
    assert ex["input_ids"] == ids(expected)
    assert ex["labels"] == ([X] * 14 + ids("hello there </s>") + [X] * 13 + ids("5 </s>"))
    assert ex["input_ids"].count(ids("<s>")[0]) == 1


def test_chat_with_pad_equal_to_eos_still_trains_the_eos_after_collation(tok_pad_eos):
    ex, _ = tokenize(CHAT, "chat", tok_pad_eos)
    short, _ = tokenize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
                        "chat", tok_pad_eos)
    eos = ids("</s>")[0]
    assert tok_pad_eos.pad_token_id == eos
    assert short["input_ids"] == ids("<|start|> user <|sep|> hi <|end|> <|start|> assistant <|sep|> ok </s>")
    assert short["labels"] == [X] * 8 + ids("ok </s>")
    batch = collate([ex, short], pad_id=tok_pad_eos.pad_token_id)
    n = len(short["input_ids"])
    assert batch["input_ids"][1, n - 1] == eos and batch["labels"][1, n - 1] == eos  # EOS trained
    assert (batch["input_ids"][1, n:] == eos).all()  # padding is the same id...
    assert (batch["labels"][1, n:] == X).all() and (batch["attention_mask"][1, n:] == 0).all()  # ...masked by place
    assert batch["attention_mask"][1, :n].all() and batch["attention_mask"][0].all()


def test_chat_template_without_bos_gets_exactly_one_from_a_bos_tokenizer():
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE.replace("{{ bos_token }}", ""))
    ex, _ = tokenize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
                     "chat", tokenizer)
    assert ex["input_ids"] == ids("<s> <|start|> user <|sep|> hi <|end|> <|start|> assistant <|sep|> ok </s>")


def test_chat_trailing_user_turn_is_cut_and_no_assistant_is_dropped(tok):
    row = {"messages": CHAT["messages"][1:3] + [{"role": "user", "content": "ok"}]}
    ex, _ = tokenize(row, "chat", tok)
    assert ex["input_ids"] == ids("<s> <|start|> user <|sep|> hi <|end|> <|start|> assistant <|sep|> hello there </s>")
    assert tokenize({"messages": [{"role": "user", "content": "hi"}]}, "chat", tok) == (None, False)


def test_chat_template_that_does_not_end_turns_with_eos_gets_a_trained_eos():
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE.replace("</s>{% else %}", "<|end|>{% else %}"))
    ex, _ = tokenize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
                     "chat", tokenizer)
    assert ex["input_ids"][-3:] == ids("ok <|end|> </s>")
    assert ex["labels"][-3:] == ids("ok <|end|> </s>")


def test_chat_prompt_tokens_match_the_generation_prompt_even_when_the_tokenizer_splits_differently():
    """GPT-2-style pre-tokenizers split "\n\n" before a letter into two tokens but keep it whole at the end of a
    generation prompt: training must show the model the prompt tokens it will see at inference."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<|start|>", "<|sep|>", "<|end|>", "\n", "\n\n",
                                         " ", "user", "assistant", "hi", "ok"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<|start|>", "<|sep|>", "<|end|>"])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+(?!\S)|\s+|\S+"), behavior="isolated")
    template = CHAT_TEMPLATE.replace("<|sep|>", "<|sep|>\n\n")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", chat_template=template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ex, _ = tokenize({"messages": messages}, "chat", tokenizer)
    v = vocab
    prompt = [v["<s>"], v["<|start|>"], v["user"], v["<|sep|>"], v["\n"], v["\n"], v["hi"], v["<|end|>"],
              v["<|start|>"], v["assistant"], v["<|sep|>"], v["\n\n"]]
    assert ex["input_ids"] == prompt + [v["ok"], v["</s>"]]
    assert ex["labels"] == [X] * len(prompt) + [v["ok"], v["</s>"]]
    inference = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=False)
    assert list(inference) == prompt


def test_chat_template_that_rewrites_history_is_a_clear_error(tmp_path):
    # like templates that drop earlier reasoning: an earlier assistant turn renders differently later on
    template = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ 'ok' if m['role'] == 'assistant' and not loop.last "
                                                            "else m['content'] }}")
    path = write_jsonl(tmp_path / "h.jsonl", [CHAT])
    with pytest.raises(UserError, match=r"h.jsonl row 1: .*chat template does not render conversations prefix"):
        build_datasets(DataConfig(path=path, format="chat", eval_fraction=0), make_tokenizer(chat_template=template))


def test_chat_needs_a_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    with pytest.raises(UserError, match="chat template"):
        build_datasets(DataConfig(path=path, format="chat"), make_tokenizer(chat_template=None))


# ------------------------------------------------------------------------------------ truncation and drops

def test_truncation_is_counted_and_the_cut_example_has_no_eos(tmp_path, tok):
    rows = [{"text": "the cat sat the dog ran the cat sat"}, {"text": "a b"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, _, stats = build_datasets(DataConfig(path=path, format="text", max_seq_len=8, eval_fraction=0), tok)
    assert train[0]["input_ids"] == ids("<s> the cat sat the dog ran the")
    assert train[1]["input_ids"] == ids("<s> a b </s>")
    assert stats.truncated == 1 and stats.dropped == 0 and stats.lengths == [8, 4]


def test_rows_with_nothing_to_train_are_dropped_and_an_empty_result_is_an_error(tmp_path, tok):
    long_prompt = {"prompt": "the cat sat the dog ran the cat sat", "completion": " 5"}
    path = write_jsonl(tmp_path / "d.jsonl", [long_prompt, {"prompt": "hi", "completion": " ok"}])
    train, _, stats = build_datasets(DataConfig(path=path, format="completion", max_seq_len=8, eval_fraction=0), tok)
    assert stats.dropped == 1 and stats.truncated == 1 and len(train) == 1
    path = write_jsonl(tmp_path / "e.jsonl", [long_prompt])
    with pytest.raises(UserError, match="no training examples"):
        build_datasets(DataConfig(path=path, format="completion", max_seq_len=8, eval_fraction=0), tok)


# ------------------------------------------------------------------------------------- files and row errors

ROWS = [{"instruction": "what is", "input": "2 + 3", "output": "5"}, {"instruction": "hi", "input": "", "output": "ok"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "save_to_disk"])
def test_every_file_kind_gives_the_same_examples(tmp_path, tok, kind):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    path = str(tmp_path / f"rows.{kind}")
    {"jsonl": lambda: ds.to_json(path, lines=True), "json": lambda: open(path, "w").write(json.dumps(ROWS)),
     "csv": lambda: ds.to_csv(path, index=False), "parquet": lambda: ds.to_parquet(path),
     "save_to_disk": lambda: ds.save_to_disk(path)}[kind]()
    train, _, _ = build_datasets(DataConfig(path=path, format="alpaca", eval_fraction=0), tok)
    prompt = ALPACA_PROMPT_INPUT.format("what is", "2 + 3")
    assert train[0]["input_ids"] == ids(f"<s> {prompt} 5 </s>")
    assert train[1]["input_ids"] == ids(f"<s> {ALPACA_PROMPT.format('hi')} ok </s>")


def test_missing_field_names_file_row_and_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", ROWS + [{"instruction": "hi"}])
    with pytest.raises(UserError) as err:
        build_datasets(DataConfig(path=path, format="alpaca", eval_fraction=0), tok)
    assert str(err.value) == (f"{path} row 3: missing field 'output' "
                              f"(format alpaca needs instruction, output[, input])")


def test_wrong_field_type_and_bad_messages_name_the_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(UserError, match=r"x.jsonl row 2: field 'text' must be a string"):
        build_datasets(DataConfig(path=path, format="text", eval_fraction=0), tok)
    path = write_jsonl(tmp_path / "m.jsonl", [CHAT, {"messages": [{"role": "user"}]}])
    with pytest.raises(UserError, match=r"m.jsonl row 2: messages\[0\]"):
        build_datasets(DataConfig(path=path, format="chat", eval_fraction=0), tok)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        load_rows(str(empty))
    with pytest.raises(UserError, match="nope.jsonl not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl is not UTF-8 .*line 2"):
        load_rows(str(latin))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(UserError, match=r"broken.jsonl line 2: invalid JSON"):
        load_rows(str(broken))
    other = tmp_path / "rows.txt"
    other.write_text("hello")
    with pytest.raises(UserError, match="unsupported file type"):
        load_rows(str(other))
    with pytest.raises(UserError, match="not a dataset saved with save_to_disk"):
        load_rows(str(tmp_path))
    with pytest.raises(UserError, match="not in the local cache|no dataset of that name is in the local cache") as err:
        load_rows("someone/not-a-cached-dataset")  # hub ids: offline, cache only
    assert "`hf download someone/not-a-cached-dataset --repo-type dataset`" in str(err.value)


# ----------------------------------------------------------------------------------------------- eval split

def test_eval_path_is_used_as_given(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c"}])
    tr, ev, stats = build_datasets(DataConfig(path=train, format="text", eval_path=evals), tok)
    assert [e["input_ids"] for e in tr] == [ids("<s> a </s>"), ids("<s> b </s>")]
    assert [e["input_ids"] for e in ev] == [ids("<s> c </s>")]
    assert stats.rows == 3


def test_eval_fraction_split_is_seeded_disjoint_and_complete(tmp_path, tok):
    words = "a b c the cat sat dog ran hi ok yes no what is 2 3 5 hello there user".split()
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": w} for w in words])
    data_cfg = DataConfig(path=path, format="text", eval_fraction=0.25)

    def split(seed):
        tr, ev, _ = build_datasets(data_cfg, tok, seed=seed)
        return [e["input_ids"][1] for e in tr], [e["input_ids"][1] for e in ev]

    tr, ev = split(0)
    assert len(ev) == 5 and len(tr) == 15
    assert sorted(tr + ev) == sorted(ids(" ".join(words)))
    assert tr == [t for t in ids(" ".join(words)) if t not in ev]  # train keeps file order
    assert split(0) == (tr, ev)
    assert split(1)[1] != ev


# ------------------------------------------------------------------------------------------- classification

def test_classification_label_names_map_to_sorted_ids(tmp_path, tok):
    rows = [{"text": "the cat", "label": "yes"}, {"text": "a dog", "label": "no"}, {"text": "hi", "label": "maybe"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    tr, _, stats = build_datasets(DataConfig(path=path, format="classification", eval_fraction=0), tok)
    assert stats.label_names == ["maybe", "no", "yes"]
    assert [e["labels"] for e in tr] == [2, 1, 0]
    assert tr[0]["input_ids"] == ids("<s> the cat")  # tokenizer defaults
    batch = collate(tr, pad_id=tok.pad_token_id)
    assert batch["labels"].tolist() == [2, 1, 0]


def test_classification_int_labels(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    tr, _, stats = build_datasets(DataConfig(path=path, format="classification", eval_fraction=0), tok)
    assert [e["labels"] for e in tr] == [0, 2] and stats.label_names == ["0", "1", "2"]
    with pytest.raises(UserError, match="model.num_labels"):
        build_datasets(DataConfig(path=path, format="classification", eval_fraction=0), tok, num_labels=2)


# ------------------------------------------------------------------------------------------ packing, batches

def test_pack_concatenates_with_restarting_positions():
    a = {"input_ids": [1, 7, 8, 2], "labels": [X, 7, 8, 2]}
    b = {"input_ids": [1, 9, 2], "labels": [X, 9, 2]}
    c = {"input_ids": [1, 10, 11, 12, 2], "labels": [X, X, 11, 12, 2]}
    rows = pack([a, b, c], max_seq_len=8)
    assert rows == [
        {"input_ids": [1, 7, 8, 2, 1, 9, 2], "labels": [X, 7, 8, 2, X, 9, 2], "position_ids": [0, 1, 2, 3, 0, 1, 2]},
        {"input_ids": [1, 10, 11, 12, 2], "labels": [X, X, 11, 12, 2], "position_ids": [0, 1, 2, 3, 4]},
    ]
    batch = collate(rows, pad_id=3)
    assert "attention_mask" not in batch  # transformers only reads packing from position_ids without a mask
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert batch["labels"][1].tolist() == [X, X, 11, 12, 2, X, X]
    assert batch["input_ids"][1].tolist() == [1, 10, 11, 12, 2, 3, 3]


def test_unpacked_collate_pads_right():
    batch = collate([{"input_ids": [1, 5, 2], "labels": [X, 5, 2]}, {"input_ids": [1, 2], "labels": [X, 2]}], 0)
    assert batch["input_ids"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 5, 2], [X, 2, X]]


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_logits_as_each_example_alone(tiny_llama, attn):
    tiny_llama.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in (5, 3, 7, 4, 6):
        tokens = torch.randint(4, 64, (n,), generator=gen).tolist()
        examples.append({"input_ids": tokens, "labels": [X] + tokens[1:]})
    rows = pack(examples, max_seq_len=16)
    assert [len(r["input_ids"]) for r in rows] == [15, 10]
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [tiny_llama(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
        leaky = tiny_llama(input_ids=batch["input_ids"], use_cache=False).logits  # no position restart
    spans = [(0, 0, 5), (0, 5, 8), (0, 8, 15), (1, 0, 4), (1, 4, 10)]
    for (row, start, end), expected in zip(spans, alone):
        torch.testing.assert_close(packed[row, start:end], expected, rtol=1e-5, atol=1e-5)
    # the check has teeth: without the restarting positions the second example sees the first one
    assert not torch.allclose(leaky[0, 5:8], alone[1], atol=1e-3)


# -------------------------------------------------------------------------------------------------- preview

def test_preview_marks_trained_tokens_and_reports_statistics(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is 2 + 3 ?", "completion": " 5"},
                                              {"prompt": "the cat sat the dog", "completion": " ok ok ok ok"}])
    text = preview(DataConfig(path=path, format="completion", max_seq_len=10, eval_fraction=0), tok)
    assert "<s> what is 2 + 3?[[5 </s>]]" in text
    assert "<s> the cat sat the dog[[ok ok ok ok]]" in text  # truncated: no EOS
    assert "min 9, mean 9.5, median 9.5, max 10; trained tokens: 6" in text
    assert "truncated to max_seq_len: 1; dropped (nothing left to train on): 0" in text


def test_classification_statistics_count_labelled_examples_not_trained_tokens(tmp_path, tok):
    rows = [{"text": "the cat sat", "label": "pos"}, {"text": "the dog", "label": "neg"},
            {"text": "ok ok ok", "label": "pos"}]
    shown = preview(DataConfig(path=write_jsonl(tmp_path / "c.jsonl", rows), format="classification",
                               eval_fraction=0), tok)
    assert "trained tokens" not in shown.splitlines()[0] and "each text is followed by its label id" in shown
    text = shown.split("--- statistics ---\n")[1]
    assert "trained tokens" not in text  # was "trained tokens: 0": a classifier trains on labels
    assert "train tokens per example: min 3, mean 3.7, median 4, max 4\n" in text
    assert "rows read: 3; train examples: 3; eval examples: 0" in text
    assert "labels: 0=neg, 1=pos" in text


def test_run_data_command_prints_the_preview(tmp_path, tok, capsys):
    tok.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tmp_path / 'model'}}}\ndata: {{path: {data}, format: chat}}\nout: x\n")
    assert main(["data", str(config), "data.eval_fraction=0", "data.packing=true"]) == 0
    out = capsys.readouterr().out
    assert "[[hello there </s>]]" in out and "[[5 </s>]]" in out and "packed into 1 rows" in out
