"""The Arrow pipeline against the row-by-row reference (data.tokenize_row + data.pack), the token cache (a changed
input is never served stale, a killed build is never trusted), folders of shards, and data.streaming (the same
examples in the same order; a resumed streaming run ends with the same adapter as one that never stopped)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from qlora_trainer import data_arrow, data_cache
from qlora_trainer import train as train_mod
from qlora_trainer.cli import main
from qlora_trainer.config import DataConfig
from qlora_trainer.data import build_datasets, load_tokenizer, pack, tokenize_row, tokenizing_detail
from qlora_trainer.data_stream import StreamingExamples
from qlora_trainer.errors import UserError
from qlora_trainer.host_memory import read_status
from tests.helpers import CHAT_TEMPLATE, make_tokenizer
from tests.test_data import CHAT, write_jsonl

ROWS = {
    "alpaca": [{"instruction": "what is", "input": "2 + 3" if i % 3 else "", "output": "5 ok " * (i % 6)}
               for i in range(60)],
    "completion": [{"prompt": "the cat sat " * (i % 5), "completion": " ok" * (i % 4)} for i in range(60)],
    "text": [{"text": "a b c the dog ran " * (i % 4)} for i in range(60)],
    "chat": [CHAT, {"messages": [{"role": "user", "content": "hi"}]}] * 20,  # every second row has nothing to train
}

MAX_LEN = {"alpaca": 40, "completion": 12, "text": 16, "chat": 40}  # some rows are cut in each format but chat


def reference(rows, data_cfg, tokenizer):
    """The list pipeline: each row through tokenize_row, the drops and truncations counted, then pack."""
    examples, truncated = [], 0
    for row in rows:
        example, cut = tokenize_row(row, data_cfg, tokenizer)
        truncated += cut
        if example is not None:
            examples.append(example)
    return (pack(examples, data_cfg.max_seq_len) if data_cfg.packing else examples), truncated


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("packing", [False, True])
def test_the_batched_pipeline_gives_the_reference_examples(tmp_path, tok, fmt, packing):
    rows = ROWS[fmt]
    data_cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format=fmt, max_seq_len=MAX_LEN[fmt],
                          packing=packing, eval_fraction=0)
    expected, truncated = reference(rows, data_cfg, tok)
    train, evals, stats = build_datasets(data_cfg, tok)
    assert list(train) == expected and len(evals) == 0
    assert stats.truncated == truncated and truncated > 0 or fmt == "chat"
    assert stats.dropped == len(rows) - stats.train_examples


def test_two_processes_and_batches_of_several_calls_give_the_same_examples_and_name_the_bad_row(tmp_path, tok,
                                                                                                monkeypatch):
    """Each worker gets map batches of 16 rows, each tokenized 5 rows a call (the last call shorter)."""
    monkeypatch.setattr(data_arrow, "MAP_BATCH", 16)
    monkeypatch.setattr(data_arrow, "TOKENIZE_BATCH", 5)
    rows = ROWS["alpaca"]
    data_cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format="alpaca", eval_fraction=0,
                          num_proc=2, max_seq_len=40)
    assert list(build_datasets(data_cfg, tok)[0]) == reference(rows, data_cfg, tok)[0]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:50] + [{"instruction": "hi"}] + rows[:5])
    with pytest.raises(UserError, match=r"bad.jsonl row 51: missing field 'output'"):
        build_datasets(DataConfig(path=bad, format="alpaca", eval_fraction=0, num_proc=2), tok)


def test_unstable_prompt_tokenization_falls_back_to_pieces_in_a_batch():
    """A batch whose rows take both paths gives each row what tokenize_row gives it."""
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE.replace("<|sep|>", "<|sep|> "))
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok " * i}]}
            for i in range(1, 6)]
    cfg = DataConfig(path="unused", format="chat")
    got = data_arrow.tokenize_batch({"messages": [r["messages"] for r in rows]}, list(range(5)), cfg=cfg,
                                    tokenizer=tokenizer, add_bos=True, label_ids=None, where="x").to_pylist()
    for row, out in zip(rows, got):
        example, _ = tokenize_row(row, cfg, tokenizer)
        assert (out["input_ids"], out["labels"]) == (example["input_ids"], example["labels"])


def test_examples_are_read_by_index(tmp_path, tok):
    rows = ROWS["text"][1:]
    data_cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format="text", eval_fraction=0.25)
    train, evals, _ = build_datasets(data_cfg, tok)
    every = list(train)
    assert train[3] == every[3] and train[-1] == every[-1] and train[2:5] == every[2:5]
    assert train.take([5, 0, 5]) == [every[5], every[0], every[5]]
    with pytest.raises(IndexError):
        train[len(train)]
    assert len(train) + len(evals) == len(rows)


LONG_ROWS = [{"instruction": f"row {i}: " + "the quick brown fox " * (i % 7 + 12), "input": "",
              "output": "jumps over the lazy dog " * (i % 5 + 18)} for i in range(12_000)]  # 18 MB of tokens
linux = pytest.mark.skipif(read_status() is None, reason="RSS is read from /proc/self/status (Linux)")


@linux
def test_reading_every_example_leaves_none_of_the_cache_resident(tmp_path, tok):
    """RSS counts the pages of a memory-mapped file a process has read: without the drops, reading a cache from end
    to end (an epoch, an eval pass) would show the whole file as resident memory, growing with the row count."""
    data_cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", LONG_ROWS), format="alpaca", eval_fraction=0.1,
                          max_seq_len=512, cache_dir=str(tmp_path / "cache"))
    train, evals, stats = build_datasets(data_cfg, tok)
    cache_bytes = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*.arrow"))
    assert cache_bytes > 16 * 2**20  # a file whose pages would be plain to see
    before = read_status()["RssFile"]
    tokens = sum(len(ex["input_ids"]) for examples in (train, evals) for ex in examples)
    shuffled = [train.take(list(range(i, len(train), 97))) for i in range(0, 97, 8)]  # reads all over the file
    grew = read_status()["RssFile"] - before
    assert tokens == sum(stats.lengths) + sum(len(ex["input_ids"]) for ex in evals) and len(shuffled) == 13
    assert grew < 4 * 2**20


@linux
def test_packing_reads_one_record_batch_at_a_time_and_holds_none(tmp_path, tok, monkeypatch):
    """Packing reads every token of the cache, the eval rows scattered over the whole file. It reads one record
    batch at a time (Table.take would first gather the whole token column, for each chunk), and the pages read are
    dropped after each batch, so the resident part of the file stays one batch's instead of growing to the whole
    file. RssFile is read before each drop (its highest point) and after it."""
    from qlora_trainer import packing

    monkeypatch.setattr(data_arrow, "MAP_BATCH", 1000)  # record batches of 1,000 rows: 1.5 MB each
    monkeypatch.setattr(packing, "CHUNK_EXAMPLES", 3000)
    before_drops, after_drops, write_packed = [], [], packing.write_packed

    def measured(*args):
        *rest, release = args

        def measure_and_release():
            before_drops.append(read_status()["RssFile"])
            release()
            after_drops.append(read_status()["RssFile"])

        return write_packed(*rest, measure_and_release)

    monkeypatch.setattr(packing, "write_packed", measured)
    data_cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", LONG_ROWS), format="alpaca", eval_fraction=0.1,
                          max_seq_len=512, packing=True, cache_dir=str(tmp_path / "cache"))
    train, evals, stats = build_datasets(data_cfg, tok)
    tokens_bytes = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("tokens/*.arrow"))
    assert tokens_bytes > 16 * 2**20
    assert max(a - b for a, b in zip(before_drops, after_drops)) < 6 * 2**20  # about one batch read at a time
    assert max(before_drops) - min(before_drops) < 8 * 2**20  # not growing batch by batch
    assert len(before_drops) >= 24  # every batch, for train and for eval

    unpacked_train, unpacked_eval, _ = build_datasets(DataConfig(**{**data_cfg.__dict__, "packing": False}), tok)
    assert list(train) == pack(list(unpacked_train), 512) and list(evals) == pack(list(unpacked_eval), 512)
    assert stats.packed_rows == len(train) and len(evals) > 0


# ------------------------------------------------------------------------------------------------ the cache

def test_the_second_build_reuses_the_cache_and_an_edited_row_is_never_stale(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, {"text": "the cat"}])
    data_cfg = DataConfig(path=path, format="text", eval_fraction=0)
    first = build_datasets(data_cfg, tok)
    second = build_datasets(data_cfg, tok)
    assert not first[2].cache_reused and second[2].cache_reused and first[2].cache == second[2].cache
    assert os.path.dirname(first[2].cache) == str(tmp_path / data_cache.CACHE_FOLDER)
    stat = os.stat(path)
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a c"}, {"text": "the cat"}])  # same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same mtime
    third = build_datasets(data_cfg, tok)
    assert not third[2].cache_reused and third[0][0]["input_ids"] != first[0][0]["input_ids"]
    assert third[0][0] == tokenize_row({"text": "a c"}, data_cfg, tok)[0]


@pytest.mark.parametrize("change", [dict(max_seq_len=9), dict(train_on_prompt=True), dict(packing=True),
                                    dict(format="completion"), "tokenizer", "seed"])
def test_everything_that_changes_the_tokens_is_a_new_entry(tmp_path, tok, change):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat sat", "completion": " ok", "text": "hi"}] * 4)
    data_cfg = DataConfig(path=path, format="text", eval_fraction=0.25)
    base = build_datasets(data_cfg, tok)[2].cache
    if change == "tokenizer":
        other = build_datasets(data_cfg, make_tokenizer(use_bos=False))[2]
    elif change == "seed":
        other = build_datasets(data_cfg, tok, seed=1)[2]
    else:
        other = build_datasets(DataConfig(**{**data_cfg.__dict__, **change}), tok)[2]
    assert not other.cache_reused and other.cache != base


def test_a_killed_build_leaves_nothing_that_is_trusted(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}] * 3)
    data_cfg = DataConfig(path=path, format="text", eval_fraction=0, packing=True, cache_dir=str(tmp_path / "c"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after writing the tokens, before the entry is complete

    monkeypatch.setattr("qlora_trainer.packing.write_packed", killed)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(data_cfg, tok)
    assert not (tmp_path / "c").exists()  # no entry, not even a temporary one or the folder made for it
    monkeypatch.undo()
    train, _, stats = build_datasets(data_cfg, tok)
    assert not stats.cache_reused and len(train) == 1 and os.path.dirname(stats.cache) == str(tmp_path / "c")


def test_a_folder_without_its_done_file_is_rebuilt(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}])
    data_cfg = DataConfig(path=path, format="text", eval_fraction=0)
    entry = build_datasets(data_cfg, tok)[2].cache
    os.remove(os.path.join(entry, data_cache.DONE_FILE))  # as a copy cut short would leave it
    again = build_datasets(data_cfg, tok)[2]
    assert again.cache == entry and not again.cache_reused


def test_a_new_entry_removes_the_entries_no_run_can_use_and_keeps_the_others(tmp_path, tok, monkeypatch):
    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, {"text": "the cat"}])
    cfg = DataConfig(path=path, format="text", eval_fraction=0, cache_dir=str(cache))
    first = build_datasets(cfg, tok)[2].cache
    shorter = build_datasets(DataConfig(**{**cfg.__dict__, "max_seq_len": 9}), tok)[2].cache
    other_cfg = DataConfig(**{**cfg.__dict__, "path": write_jsonl(tmp_path / "other.jsonl", [{"text": "a dog"}])})
    other = build_datasets(other_cfg, tok)[2]
    assert other.cache_removed == (0, 0) and len({first, shorter, other.cache}) == 3  # all still usable
    not_ours = cache / "notes"  # anything else in the folder is never touched
    not_ours.mkdir()
    (not_ours / data_cache.DONE_FILE).write_text("{}")
    first_bytes = sum(f.stat().st_size for f in Path(first).rglob("*") if f.is_file())

    write_jsonl(tmp_path / "d.jsonl", [{"text": "a c"}, {"text": "the cat"}])  # the file edited
    edited = build_datasets(cfg, tok)[2]

    assert not os.path.exists(first) and not os.path.exists(shorter)  # built from contents the file no longer has
    assert os.path.isdir(other.cache) and not_ours.is_dir()
    assert edited.cache_removed[0] == 2 and edited.cache_removed[1] > first_bytes
    assert "removed 2 old entries no run can use" in tokenizing_detail(edited)
    assert build_datasets(other_cfg, tok)[2].cache_reused

    older = cache / ("0" * data_cache.KEY_LENGTH)  # an entry from before entries recorded their key
    shutil.copytree(other.cache, older)
    os.remove(older / data_cache.KEY_FILE)
    monkeypatch.setattr(data_cache, "code_digest", lambda: "the next version")
    newest = build_datasets(cfg, tok)[2]
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(newest.cache).name, "notes"])
    assert newest.cache_removed[0] == 3  # another version's pipeline can never be served: edited, other, older


# ------------------------------------------------------------------------------------------------ sources

@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_folder_of_shards_reads_as_one_file_in_name_order(tmp_path, tok, kind):
    import datasets

    rows = ROWS["alpaca"]
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, start in enumerate(range(0, len(rows), 25)):
        part = datasets.Dataset.from_list(rows[start:start + 25])
        name = str(folder / f"part-{i:03d}.{kind}")
        part.to_json(name, lines=True) if kind == "jsonl" else part.to_parquet(name)
    (folder / "README.md").write_text("notes")
    whole = DataConfig(path=write_jsonl(tmp_path / "all.jsonl", rows), format="alpaca", eval_fraction=0)
    sharded = DataConfig(path=str(folder), format="alpaca", eval_fraction=0)
    assert list(build_datasets(sharded, tok)[0]) == list(build_datasets(whole, tok)[0])
    (folder / f"part-000.{kind}").write_text("")
    with pytest.raises(UserError, match="part-000"):
        build_datasets(sharded, tok)


# ------------------------------------------------------------------------------------------------ streaming

@pytest.mark.parametrize("packing", [False, True])
def test_streaming_yields_the_examples_in_file_order_and_seeks_exactly(tmp_path, tok, packing):
    rows = ROWS["alpaca"][:23]
    data_cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format="alpaca", eval_fraction=0,
                          max_seq_len=40, packing=packing, streaming=True)
    expected, _ = reference(rows, data_cfg, tok)
    stream = StreamingExamples(data_cfg, tok)
    first = stream.next_examples(5)
    position = stream.position
    rest = stream.next_examples(len(expected) - 5 + 3)  # past the end: the next epoch starts over
    assert first + rest == expected + expected[:3]
    resumed = StreamingExamples(data_cfg, tok)
    resumed.seek(position)
    assert resumed.next_examples(len(expected) - 5 + 3) == rest


@pytest.mark.slow
def test_a_resumed_streaming_run_ends_with_the_adapter_of_a_straight_run(tmp_path, monkeypatch):
    from qlora_trainer import checkpoint as ckpt
    from tests.helpers import straight_and_stopped_at_step_2
    from tests.test_train import _adapter_tensors, _config

    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(2)))

    def run_config(out, resume=False):
        cfg = _config(out, eval_path, max_steps=4, save_every=2, batch_size=2, **{"data.streaming": True,
                                                                                  "data.packing": True})
        cfg.resume = resume
        return cfg

    straight_and_stopped_at_step_2(run_config, tmp_path, monkeypatch)
    state = json.loads((ckpt.checkpoint_dir(tmp_path / "resumed", 2) / ckpt.STATE_FILE).read_text())
    assert state["stream"]["epoch"] == 0 and state["stream"]["row"] > 0  # the skip count a resumed run uses
    train_mod.train(run_config(tmp_path / "resumed", resume=True), progress=False, log=lambda *_: None)
    a, b = _adapter_tensors(tmp_path / "straight" / "adapter"), _adapter_tensors(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the skip count is the row after the 2 steps' 8 (packed) examples, not a count of steps
    cfg = run_config(tmp_path / "x")
    stream = StreamingExamples(cfg.data, load_tokenizer(cfg.model.path))
    stream.next_examples(8)
    assert state["stream"] == stream.position and stream.position["row"] > 8


def test_streaming_refuses_epochs_and_classification(tmp_path, tok):
    from tests.test_train import _config

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(UserError, match="data.streaming does not support format classification"):
        StreamingExamples(DataConfig(path=path, format="classification", streaming=True), tok)
    cfg = _config(tmp_path / "run", tmp_path / "none.jsonl", max_steps=None, epochs=1,
                  **{"data.streaming": True, "data.eval_path": None})
    run = train_mod.Run(cfg, progress=False, log=lambda *_: None)
    run._load_data()  # the tokenizer and the stream: no pass over the rows
    with pytest.raises(UserError, match="train.epochs needs the number of examples.*set train.max_steps"):
        run._plan_steps()


# ------------------------------------------------------------------------------------------------ the command

def test_data_command_prints_its_time_and_fills_the_cache_train_reads(tmp_path, tok, capsys):
    tok.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 5)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tmp_path / 'model'}}}\ndata: {{path: {data}, format: chat}}\nout: x\n")
    assert main(["data", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("done in ") and "rows/s, cache written to " + str(tmp_path / data_cache.CACHE_FOLDER) in out
    assert main(["data", str(config)]) == 0
    assert "cache reused from" in capsys.readouterr().out.splitlines()[-1]


def test_tokenizing_draws_a_bar_with_rows_per_second_only_when_asked(tmp_path, tok, capfd):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS["text"])
    build_datasets(DataConfig(path=path, format="text", eval_fraction=0), tok, progress=False)
    assert capfd.readouterr().err == ""
    build_datasets(DataConfig(path=path, format="text", eval_fraction=0, max_seq_len=9), tok, progress=True)
    bar = capfd.readouterr().err
    assert "tokenizing d.jsonl" in bar and "60/60" in bar and "examples/s" in bar  # an example is a row
