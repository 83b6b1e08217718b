"""The Arrow pipeline: rows -> rendered, tokenized, masked (and packed) examples in memory-mapped Arrow files, built
once by a batched multi-process `datasets.map` and reused from the token cache (data_cache.py).

The rules are data.py's (rendering, masks, BOS/EOS, truncation, drops, row errors); this module applies them a
batch at a time: one fast-tokenizer call for the texts of a batch (with offsets), one for the prompts whose
tokenization must be checked, the BOS rule decided once, masks built from spans of tokens rather than per token.

A cache entry holds tokens/*.arrow (one row per source row, in file order, with `kept` and `truncated`),
the train/eval row numbers (train.npy, eval.npy), packed files when data.packing, and stats.json."""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_trainer import data_cache
from qlora_trainer.config import DataConfig
from qlora_trainer.data import DataStats, RowError, _field, _segments, check_chat_template, label_id, uses_bos
from qlora_trainer.data_sources import load_rows
from qlora_trainer.errors import UserError
from qlora_trainer.names import CLASSIFICATION, IGNORE_INDEX

logger = logging.getLogger(__name__)

MIN_ROWS_PER_PROCESS = 20_000  # below this a worker process costs more than it saves
MAP_BATCH = 1000
COLUMNS = ("input_ids", "labels")


class Examples(Sequence):
    """Tokenized examples read lazily by index from a memory-mapped Arrow dataset: ex[i] -> {"input_ids": [...],
    "labels": ...}, ex[a:b] -> a list of such dicts, ex.take(indices) -> the same in one Arrow read. `rows`
    (optional) maps example i to row rows[i] of the dataset."""

    def __init__(self, dataset, rows: np.ndarray | None = None):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.dataset) if self.rows is None else len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        return self.take([i % n])[0]

    def take(self, indices) -> list[dict]:
        indices = [int(i) for i in indices]
        if not indices:
            return []
        rows = indices if self.rows is None else self.rows[indices].tolist()
        columns = self.dataset[rows]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), 1024):
            yield from self.take(range(start, min(start + 1024, len(self))))


@dataclass
class Prepared:
    train: Examples
    eval: Examples
    unpacked_train: Examples  # what `data` shows (the same as train without packing)
    stats: DataStats
    cache: Path
    reused: bool


# ------------------------------------------------------------------------------------------------ one batch

def _row_error(where: str, index: int, err: RowError) -> UserError:
    return UserError(f"{where} row {index + 1}: {err}")


def _spans(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(text, the character spans of trained pieces, where each response that follows a prompt starts)."""
    spans, starts, pos = [], [], 0
    for i, (piece, trained) in enumerate(segments):
        if trained:
            spans.append((pos, pos + len(piece)))
            if i > 0 and not segments[i - 1][1]:
                starts.append(pos)
        pos += len(piece)
    return "".join(t for t, _ in segments), spans, starts


def _token_ranges(encoding, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges overlapping the character spans: the first token ending after the span's start to the
    first starting at or after its end. Offsets are in order, so two binary searches a span, reading single
    offsets from the Rust encoding (materializing all of them costs more than tokenizing)."""
    n = len(encoding.ids)
    offset = encoding.token_to_chars

    def first(test) -> int:  # the first token index for which test(offsets) holds (monotone), else n
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if test(offset(mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    return [(first(lambda o, s=s: o[1] > s), first(lambda o, e=e: o[0] >= e)) for s, e in spans]


def _backend_encode(tokenizer, texts: list[str], offsets: bool = True) -> list:
    """The Rust encode_batch that tokenizer(texts, add_special_tokens=False) calls, without its conversion of every
    encoding into Python dicts (type ids, masks: half the time of a batch). The empty call first leaves the backend
    as such a call wants it (no truncation, no padding, special tokens as the tokenizer splits them)."""
    tokenizer("", add_special_tokens=False)
    backend = tokenizer._tokenizer
    if not offsets and hasattr(backend, "encode_batch_fast"):  # no offsets computed
        return backend.encode_batch_fast(texts, add_special_tokens=False)
    return backend.encode_batch(texts, add_special_tokens=False)


def _encode_batch(tokenizer, segments_list: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list]]:
    """data._encode for a batch: (ids, trained token ranges) a row, the same tokens and masks."""
    out: list = [None] * len(segments_list)
    pieces = [_spans(s) for s in segments_list]
    if getattr(tokenizer, "is_fast", False) and segments_list:
        encodings = _backend_encode(tokenizer, [t for t, _, _ in pieces])
        full_ids = [e.ids for e in encodings]
        checks = [(r, start) for r, (_, _, starts) in enumerate(pieces) for start in starts]
        alone = _backend_encode(tokenizer, [pieces[r][0][:s] for r, s in checks], offsets=False) if checks else []
        unstable = set()
        for (r, start), prompt in zip(checks, alone):
            full, prompt = full_ids[r], prompt.ids
            n = len(prompt)
            if full[:n] != prompt or (n < len(full) and encodings[r].token_to_chars(n)[0] < start):
                unstable.add(r)
        for r, (_, spans, _) in enumerate(pieces):
            if r not in unstable:
                out[r] = (full_ids[r], _token_ranges(encodings[r], spans))
    todo = [r for r, o in enumerate(out) if o is None]  # piece by piece, as data._encode's fallback
    flat = [piece for r in todo for piece, _ in segments_list[r]]
    piece_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    for r in todo:
        ids, ranges = [], []
        for _, trained in segments_list[r]:
            part = next(piece_ids)
            if trained:
                ranges.append((len(ids), len(ids) + len(part)))
            ids += part
        out[r] = (ids, ranges)
    return out


def _finish(ids: list[int], ranges: list, text: str, specials: tuple, max_len: int):
    """data.tokenize_row's BOS/EOS/first-token/truncation rules on (ids, ranges) -> (ids, labels or None, cut?).
    `specials`: (BOS text or None when no BOS is added, BOS id, EOS id)."""
    bos_text, bos, eos = specials
    if bos_text is not None and not text.startswith(bos_text):
        ids, ranges = [bos] + ids, [(a + 1, b + 1) for a, b in ranges]
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    ranges = ranges + [(len(ids) - 1, len(ids))]  # the final EOS is always trained
    truncated = len(ids) > max_len
    ids = ids[:max_len]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        a, b = max(a, 1), min(b, len(ids))  # nothing predicts the first token
        if a < b:
            labels[a:b] = ids[a:b]
    if labels.count(IGNORE_INDEX) == len(labels):
        return ids, None, truncated
    return ids, labels, truncated


def _causal_batch(rows: list[dict], indices: list[int], cfg: DataConfig, tokenizer, add_bos: bool, where: str):
    segments_list = []
    for row, index in zip(rows, indices):
        try:
            segments = _segments(row, cfg.format, tokenizer)
        except RowError as err:
            raise _row_error(where, index, err) from err
        if cfg.train_on_prompt:
            segments = [(t, True) for t, _ in segments]
        segments_list.append(segments)
    live = [r for r, s in enumerate(segments_list) if s]
    encoded = _encode_batch(tokenizer, [segments_list[r] for r in live])
    result = [([], None, False)] * len(rows)  # no segments: nothing to train on
    specials = (tokenizer.bos_token if add_bos else None, tokenizer.bos_token_id, tokenizer.eos_token_id)
    for r, (ids, ranges) in zip(live, encoded):
        result[r] = _finish(ids, ranges, segments_list[r][0][0], specials, cfg.max_seq_len)
    return result


def _classification_batch(rows: list[dict], indices: list[int], cfg: DataConfig, tokenizer, label_ids, where: str):
    texts, labels = [], []
    for row, index in zip(rows, indices):
        try:
            texts.append(_field(row, "text", CLASSIFICATION))
            labels.append(label_id(row.get("label"), label_ids))
        except RowError as err:
            raise _row_error(where, index, err) from err
    encoded = tokenizer(texts)["input_ids"] if texts else []
    return [(ids[:cfg.max_seq_len], label, len(ids) > cfg.max_seq_len) for ids, label in zip(encoded, labels)]


def tokenize_batch(batch: dict, indices: list[int], *, cfg: DataConfig, tokenizer, add_bos: bool, label_ids,
                   where: str):
    """datasets.map's batched function: rows -> an Arrow table with one row per input row (input_ids, labels,
    trained, truncated, kept); a row with nothing to train on is kept=False with empty lists."""
    import pyarrow as pa

    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*batch.values())]
    if cfg.format == CLASSIFICATION:
        result = _classification_batch(rows, indices, cfg, tokenizer, label_ids, where)
        labels = pa.array([label for _, label, _ in result], type=pa.int64())
        trained = [1] * len(result)
        kept = [True] * len(result)
    else:
        result = _causal_batch(rows, indices, cfg, tokenizer, add_bos, where)
        kept = [labels is not None for _, labels, _ in result]
        labels = pa.array([lab if lab is not None else [] for _, lab, _ in result], type=pa.list_(pa.int32()))
        trained = [0 if lab is None else len(lab) - lab.count(IGNORE_INDEX) for _, lab, _ in result]
    input_ids = pa.array([ids if k else [] for (ids, _, _), k in zip(result, kept)], type=pa.list_(pa.int32()))
    return pa.table({"input_ids": input_ids, "labels": labels, "trained": pa.array(trained, type=pa.int32()),
                     "truncated": pa.array([t for _, _, t in result], type=pa.bool_()),
                     "kept": pa.array(kept, type=pa.bool_())})


# ------------------------------------------------------------------------------------------------ building

def num_processes(setting: int | None, rows: int) -> int:
    """data.num_proc, or the cores this process may use (one per MIN_ROWS_PER_PROCESS rows, at least one)."""
    if setting:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, rows // MIN_ROWS_PER_PROCESS))


def _label_map(datasets_) -> dict | None:
    """Classification labels: names -> ids in sorted order; int ids stay as they are (None)."""
    names = set()
    for ds in datasets_:
        if "label" in ds.column_names:
            names |= {v for v in ds.unique("label") if isinstance(v, str)}
    return {name: i for i, name in enumerate(sorted(names))} if names else None


def _tokenize_file(rows, out: Path, where: str, cfg: DataConfig, tokenizer, label_ids, num_proc: int | None,
                   progress: bool):
    """Map `rows` into Arrow files under `out` -> the tokenized dataset (memory-mapped)."""
    import datasets

    out.mkdir(parents=True)
    add_bos = tokenizer.bos_token is not None and uses_bos(tokenizer)  # once, not per row
    procs = num_processes(num_proc, len(rows))
    bars_were_on = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    try:
        return rows.map(tokenize_batch, batched=True, batch_size=MAP_BATCH, with_indices=True,
                        remove_columns=rows.column_names, num_proc=procs if procs > 1 else None,
                        fn_kwargs=dict(cfg=cfg, tokenizer=tokenizer, add_bos=add_bos, label_ids=label_ids,
                                       where=where),
                        cache_file_name=str(out / "data.arrow"), load_from_cache_file=False,
                        new_fingerprint=out.parent.name + out.name, desc=f"tokenizing {os.path.basename(where)}")
    finally:
        (datasets.enable_progress_bars if bars_were_on else datasets.disable_progress_bars)()


def _split(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded choice of round(n * fraction) rows (at least one, never all) as a boolean mask."""
    chosen = np.zeros(n, dtype=bool)
    if fraction > 0 and n > 1:
        n_eval = min(n - 1, max(1, round(n * fraction)))
        chosen[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return chosen


def _column(ds, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy()


def _lengths(ds) -> np.ndarray:
    """Token count of every row, from the list offsets (no token is read)."""
    parts = [np.diff(chunk.offsets.to_numpy()) for chunk in ds.data.column("input_ids").chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _build(entry: Path, cfg: DataConfig, tokenizer, seed: int, num_labels: int | None, progress: bool) -> None:
    """Fill a cache entry folder (see the module docstring)."""
    started = time.perf_counter()
    raw = str(entry / "raw")  # datasets' Arrow copy of the text files: removed once tokenized
    train_rows = load_rows(cfg.path, cache_dir=raw)
    eval_rows = load_rows(cfg.eval_path, cache_dir=raw) if cfg.eval_path else None
    label_ids = _label_map([r for r in (train_rows, eval_rows) if r is not None]) if cfg.format == CLASSIFICATION \
        else None
    stats = {"rows": len(train_rows) + (len(eval_rows) if eval_rows is not None else 0)}
    tokens = _tokenize_file(train_rows, entry / "tokens", cfg.path, cfg, tokenizer, label_ids, cfg.num_proc, progress)
    kept = _column(tokens, "kept")
    in_eval = _split(len(tokens), 0 if eval_rows is not None else cfg.eval_fraction, seed)
    train_idx = np.flatnonzero(kept & ~in_eval)
    truncated, dropped = int(_column(tokens, "truncated").sum()), int((~kept).sum())
    if eval_rows is not None:
        eval_tokens = _tokenize_file(eval_rows, entry / "eval_tokens", cfg.eval_path, cfg, tokenizer, label_ids,
                                     cfg.num_proc, progress)
        eval_kept = _column(eval_tokens, "kept")
        eval_idx = np.flatnonzero(eval_kept)
        truncated += int(_column(eval_tokens, "truncated").sum())
        dropped += int((~eval_kept).sum())
    else:
        eval_tokens, eval_idx = tokens, np.flatnonzero(kept & in_eval)
    shutil.rmtree(raw, ignore_errors=True)
    if len(train_idx) == 0:
        raise UserError(f"{cfg.path}: no training examples left after dropping {dropped} rows with nothing to "
                        f"train on (e.g. no assistant message, or the prompt fills max_seq_len {cfg.max_seq_len}): "
                        f"check data.format and data.max_seq_len")
    np.save(entry / "train.npy", train_idx)
    np.save(entry / "eval.npy", eval_idx)
    lengths = _lengths(tokens)[train_idx]
    stats.update(train_examples=len(train_idx), eval_examples=len(eval_idx), truncated=truncated, dropped=dropped,
                 trained_tokens=int(_column(tokens, "trained")[train_idx].sum()))
    if cfg.format == CLASSIFICATION:
        stats["trained_tokens"] = 0
        stats["label_names"] = _label_names(label_ids, tokens, train_idx, eval_tokens, eval_idx, num_labels, cfg.path)
    elif cfg.packing:
        from qlora_trainer.packing import write_packed

        stats["packed_rows"] = write_packed(tokens.data.table, train_idx, lengths, cfg.max_seq_len,
                                            str(entry / "packed_train.arrow"))
        write_packed(eval_tokens.data.table, eval_idx, _lengths(eval_tokens)[eval_idx], cfg.max_seq_len,
                     str(entry / "packed_eval.arrow"))
    stats["seconds"] = round(time.perf_counter() - started, 3)
    (entry / data_cache.DONE_FILE).write_text(json.dumps(stats))


def _label_names(label_ids, tokens, train_idx, eval_tokens, eval_idx, num_labels, where) -> list[str]:
    if label_ids is not None:
        names = list(label_ids)
    else:
        top = max(int(_column(tokens, "labels")[train_idx].max()),
                  int(_column(eval_tokens, "labels")[eval_idx].max()) if len(eval_idx) else 0)
        names = [str(i) for i in range(max(top + 1, num_labels or 0))]
    if num_labels is not None and len(names) > num_labels:
        raise UserError(f"{where} has {len(names)} labels but model.num_labels is {num_labels}: raise "
                        f"model.num_labels or leave it unset")
    return names


def _open_arrow(folder: Path):
    import datasets

    files = sorted(folder.glob("*.arrow"))
    parts = [datasets.Dataset.from_file(str(f)) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _key(cfg: DataConfig, tokenizer, seed: int, num_labels: int | None) -> str:
    return data_cache.cache_key({
        "data": data_cache.data_digest(cfg.path),
        "eval": data_cache.data_digest(cfg.eval_path) if cfg.eval_path else None,
        "format": cfg.format, "max_seq_len": cfg.max_seq_len, "packing": cfg.packing and cfg.format != CLASSIFICATION,
        "train_on_prompt": cfg.train_on_prompt, "eval_fraction": 0 if cfg.eval_path else cfg.eval_fraction,
        "seed": seed if cfg.eval_fraction and not cfg.eval_path else 0, "num_labels": num_labels,
        "tokenizer": data_cache.tokenizer_digest(tokenizer), "code": data_cache.code_digest()})


def prepare(cfg: DataConfig, tokenizer, seed: int = 0, num_labels: int | None = None,
            progress: bool = False) -> Prepared:
    """The train and eval examples of `cfg` from the token cache, built first when it has no entry for them."""
    check_chat_template(cfg, tokenizer)
    if cfg.format != CLASSIFICATION and tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, so examples cannot teach the model to stop: "
                        "set eos_token in the tokenizer files")
    root = data_cache.cache_root(cfg.path, cfg.cache_dir)
    entry, reused = data_cache.cached_entry(root, _key(cfg, tokenizer, seed, num_labels),
                                            lambda tmp: _build(tmp, cfg, tokenizer, seed, num_labels, progress))
    saved = json.loads((entry / data_cache.DONE_FILE).read_text())
    tokens = _open_arrow(entry / "tokens").select_columns(list(COLUMNS))
    eval_tokens = _open_arrow(entry / "eval_tokens").select_columns(list(COLUMNS)) if cfg.eval_path else tokens
    train_idx, eval_idx = np.load(entry / "train.npy"), np.load(entry / "eval.npy")
    unpacked = Examples(tokens, train_idx)
    train, evals = unpacked, Examples(eval_tokens, eval_idx)
    if "packed_rows" in saved:
        import datasets

        train = Examples(datasets.Dataset.from_file(str(entry / "packed_train.arrow")))
        evals = Examples(datasets.Dataset.from_file(str(entry / "packed_eval.arrow")))
    stats = DataStats(rows=saved["rows"], train_examples=saved["train_examples"],
                      eval_examples=saved["eval_examples"], truncated=saved["truncated"], dropped=saved["dropped"],
                      lengths=Lengths(_lengths(tokens)[train_idx]), trained_tokens=saved["trained_tokens"],
                      packed_rows=saved.get("packed_rows"), label_names=saved.get("label_names"))
    stats.cache, stats.cache_reused, stats.build_seconds = str(entry), reused, saved["seconds"]
    if stats.truncated:
        logger.warning("%d examples were longer than data.max_seq_len=%d and were truncated (they lose their EOS)",
                       stats.truncated, cfg.max_seq_len)
    if stats.dropped:
        logger.warning("%d rows had no tokens left to train on and were dropped", stats.dropped)
    return Prepared(train, evals, unpacked, stats, entry, reused)


class Lengths(Sequence):
    """Token lengths of the train examples, a numpy array that reads like a list (DataStats.lengths)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i].tolist()

    def __eq__(self, other) -> bool:
        return list(self.values.tolist()) == list(other)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)
