"""The Arrow pipeline: rows -> rendered, tokenized, masked (and packed) examples in memory-mapped Arrow files, built
once by a batched multi-process `datasets.map` and reused from the token cache (data_cache.py).

The rules are data.py's (rendering, masks, BOS/EOS, truncation, drops, row errors), applied a batch at a time by
data_batches.tokenize_batch.

A cache entry holds tokens/*.arrow (one row per source row, in file order, with `kept` and `truncated`),
the train/eval row numbers (train.npy, eval.npy), packed files when data.packing, and stats.json.

Memory stays flat in the row count. RSS counts every page of a memory-mapped file a process has read, so each
process drops the mapped pages it has read (libc.drop_mapped_pages): after each map batch, at the end of a build
and of opening an entry, and after each read of examples (a random read can map a whole large folio of the file, a
megabyte or more). The files are written in few, large record batches, because opening one touches the header page
of every batch."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_trainer import data_cache, libc
from qlora_trainer.config import DataConfig
from qlora_trainer.data import DataStats, check_chat_template, uses_bos
from qlora_trainer.data_batches import tokenize_batch
from qlora_trainer.data_sources import load_rows
from qlora_trainer.errors import UserError
from qlora_trainer.names import CLASSIFICATION

logger = logging.getLogger(__name__)

MIN_ROWS_PER_PROCESS = 20_000  # below this a worker process costs more than it saves
MAP_BATCH = 10_000  # rows a call of the map function: one record batch of the cache files
TOKENIZE_BATCH = 1000  # rows a call of tokenize_batch: the Python objects of one such call are what a worker holds
WRITER_BATCH = 20_000  # rows an Arrow record batch at most
COLUMNS = ("input_ids", "labels")


class Examples(Sequence):
    """Tokenized examples read lazily by index from a memory-mapped Arrow dataset: ex[i] -> {"input_ids": [...],
    "labels": ...}, ex[a:b] -> a list of such dicts, ex.take(indices) -> the same in one Arrow read. `rows`
    (optional) maps example i to row rows[i] of the dataset; `folder` (optional): the folder of the mapped files,
    whose pages are dropped after each read (see the module docstring)."""

    def __init__(self, dataset, rows: np.ndarray | None = None, folder: Path | None = None):
        self.dataset, self.rows, self.folder = dataset, rows, folder

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
        if self.folder is not None:
            libc.drop_mapped_pages(self.folder)  # under a millisecond; RSS would otherwise grow with every read
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


def _map_batch(batch: dict, indices: list[int], *, mapped: str, rows_a_call: int, **kwargs):
    """datasets.map's function: tokenize_batch `rows_a_call` rows at a time, one table for the whole map batch,
    then drop the pages of the mapped input (under `mapped`) this process has read."""
    import pyarrow as pa

    tables = [tokenize_batch({k: v[a:a + rows_a_call] for k, v in batch.items()}, indices[a:a + rows_a_call],
                             **kwargs) for a in range(0, len(indices), rows_a_call)]
    libc.drop_mapped_pages(mapped)
    return pa.concat_tables(tables).combine_chunks()  # one record batch, not one per call of tokenize_batch


def _tokenize_file(rows, out: Path, where: str, cfg: DataConfig, tokenizer, label_ids, num_proc: int | None,
                   progress: bool):
    """Map `rows` into Arrow files under `out` -> the tokenized dataset (memory-mapped)."""
    import datasets

    out.mkdir(parents=True)
    add_bos = tokenizer.bos_token is not None and uses_bos(tokenizer)  # once, not per row
    mapped = _folder_of(rows, out.parent)
    libc.drop_mapped_pages(mapped)  # the header pages loading touched, before the workers fork with them
    procs = num_processes(num_proc, len(rows))
    bars_were_on = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    try:
        return rows.map(_map_batch, batched=True, batch_size=MAP_BATCH, writer_batch_size=WRITER_BATCH,
                        with_indices=True,
                        remove_columns=rows.column_names, num_proc=procs if procs > 1 else None,
                        fn_kwargs=dict(cfg=cfg, tokenizer=tokenizer, add_bos=add_bos, label_ids=label_ids,
                                       where=where, mapped=mapped, rows_a_call=TOKENIZE_BATCH),
                        cache_file_name=str(out / "data.arrow"), load_from_cache_file=False,
                        new_fingerprint=out.parent.name + out.name, desc=f"tokenizing {os.path.basename(where)}")
    finally:
        (datasets.enable_progress_bars if bars_were_on else datasets.disable_progress_bars)()


def _folder_of(ds, default: Path) -> str:
    """The folder holding the files `ds` is memory-mapped from (`default` unless that is one folder)."""
    folders = {os.path.dirname(f["filename"]) for f in ds.cache_files}
    return folders.pop() if len(folders) == 1 else str(default)


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

        drop = functools.partial(libc.drop_mapped_pages, entry)  # the token pages packing has read
        stats["packed_rows"] = write_packed(tokens.data.table, train_idx, lengths, cfg.max_seq_len,
                                            str(entry / "packed_train.arrow"), drop)
        write_packed(eval_tokens.data.table, eval_idx, _lengths(eval_tokens)[eval_idx], cfg.max_seq_len,
                     str(entry / "packed_eval.arrow"), drop)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    (entry / data_cache.DONE_FILE).write_text(json.dumps(stats))
    libc.drop_mapped_pages(entry)


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


def _key_parts(cfg: DataConfig, tokenizer, seed: int, num_labels: int | None) -> dict:
    """Everything that changes the tokens of an entry (data_cache.py)."""
    return {
        "data": data_cache.data_digest(cfg.path),
        "eval": data_cache.data_digest(cfg.eval_path) if cfg.eval_path else None,
        "format": cfg.format, "max_seq_len": cfg.max_seq_len, "packing": cfg.packing and cfg.format != CLASSIFICATION,
        "train_on_prompt": cfg.train_on_prompt, "eval_fraction": 0 if cfg.eval_path else cfg.eval_fraction,
        "seed": seed if cfg.eval_fraction and not cfg.eval_path else 0, "num_labels": num_labels,
        "tokenizer": data_cache.tokenizer_digest(tokenizer), "code": data_cache.code_digest()}


def prepare(cfg: DataConfig, tokenizer, seed: int = 0, num_labels: int | None = None,
            progress: bool = False) -> Prepared:
    """The train and eval examples of `cfg` from the token cache, built first when it has no entry for them."""
    check_chat_template(cfg, tokenizer)
    if cfg.format != CLASSIFICATION and tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, so examples cannot teach the model to stop: "
                        "set eos_token in the tokenizer files")
    root = data_cache.cache_root(cfg.path, cfg.cache_dir)
    parts = _key_parts(cfg, tokenizer, seed, num_labels)
    source = os.path.abspath(cfg.path) if os.path.exists(cfg.path) else cfg.path
    entry, reused = data_cache.cached_entry(root, parts, source,
                                            lambda tmp: _build(tmp, cfg, tokenizer, seed, num_labels, progress))
    removed = (0, 0) if reused else data_cache.remove_unusable(root, entry, parts, source)
    saved = json.loads((entry / data_cache.DONE_FILE).read_text())
    tokens = _open_arrow(entry / "tokens").select_columns(list(COLUMNS))
    eval_tokens = _open_arrow(entry / "eval_tokens").select_columns(list(COLUMNS)) if cfg.eval_path else tokens
    train_idx, eval_idx = np.load(entry / "train.npy"), np.load(entry / "eval.npy")
    unpacked = Examples(tokens, train_idx, entry)
    train, evals = unpacked, Examples(eval_tokens, eval_idx, entry)
    if "packed_rows" in saved:
        import datasets

        train = Examples(datasets.Dataset.from_file(str(entry / "packed_train.arrow")), folder=entry)
        evals = Examples(datasets.Dataset.from_file(str(entry / "packed_eval.arrow")), folder=entry)
    stats = DataStats(rows=saved["rows"], train_examples=saved["train_examples"],
                      eval_examples=saved["eval_examples"], truncated=saved["truncated"], dropped=saved["dropped"],
                      lengths=Lengths(_lengths(tokens)[train_idx]), trained_tokens=saved["trained_tokens"],
                      packed_rows=saved.get("packed_rows"), label_names=saved.get("label_names"))
    stats.cache, stats.cache_reused, stats.build_seconds = str(entry), reused, saved["seconds"]
    stats.cache_removed = removed
    libc.drop_mapped_pages(entry)  # the header pages opening touched, the offsets the lengths came from
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
