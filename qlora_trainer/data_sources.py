"""Where rows come from: a jsonl/json/csv/parquet file, a folder of such shards, a `save_to_disk` folder, or a hub
dataset already in the local cache (never the network). Rows come back as a `datasets.Dataset` (memory-mapped
Arrow), or, for data.streaming, as a `datasets.IterableDataset` read lazily in file order.

`source_files` lists the files a path reads, which the token cache keys on (data_cache.py)."""

from __future__ import annotations

import codecs
import contextlib
import json
import os

from qlora_trainer.errors import UserError
from qlora_trainer.jsonl import bad_line

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
IGNORED_IN_FOLDERS = (".md", ".txt.lock")  # a README beside the shards is no shard
ARROW_BATCH_ROWS = 20_000  # rows a record batch of the Arrow copy of text files (datasets writes 1,000: opening a
                           # memory-mapped file touches each batch's header page, which RSS then counts)


# ----------------------------------------------------------------------------------------------- checks

def _check_utf8(path: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line = newlines + chunk[: max(err.start, 0)].count(b"\n") + 1
                raise UserError(f"{path} is not UTF-8 text (bad byte at offset {offset + err.start}, line {line}): "
                                f"re-save it as UTF-8") from err
            offset += len(chunk)
            newlines += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text (truncated character at the end): re-save it as UTF-8") from err


def _find_bad_json(path: str) -> str | None:
    """Locate the first JSON syntax error (line number) to give a better message than the reader's."""
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            for number, line in enumerate(fh, 1):
                problem = bad_line(path, number, line) if line.strip() else None
                if problem is not None:
                    return problem
            return None
        try:
            json.load(fh)
        except json.JSONDecodeError as err:
            return f"{path} line {err.lineno}: invalid JSON ({err.msg})"
    return None


def _check_file(path: str) -> str:
    """The builder name of a readable, non-empty data file ("json", "csv", "parquet"); UserError otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise UserError(f"{path}: unsupported file type '{ext}': use .jsonl, .json, .csv or .parquet")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} is not readable: check its permissions")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty: it needs at least one row")
    if ext != ".parquet":
        _check_utf8(path)
    return FILE_BUILDERS[ext]


# ----------------------------------------------------------------------------------------------- what a path is

def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in SAVED_MARKERS)


def shard_files(folder: str) -> list[str]:
    """The data files of a folder of shards, sorted by name (the row order); UserError when the folder is not one
    folder of shards of a single kind."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith((".", "_")) and not n.endswith(IGNORED_IN_FOLDERS))
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if not files or not kinds <= set(FILE_BUILDERS) or len({FILE_BUILDERS[k] for k in kinds}) > 1:
        others = [os.path.basename(f) for f in files if os.path.splitext(f)[1].lower() not in FILE_BUILDERS]
        held = f" (it holds {', '.join(others[:3])})" if others else " (it holds no data files)" if not files else ""
        raise UserError(f"{folder} is a folder but not a dataset saved with save_to_disk, nor a folder of shards of "
                        f"one kind (.jsonl/.json, .csv or .parquet){held}: point data.path at a file or such a "
                        f"folder")
    return files


def source_files(path: str) -> list[str] | None:
    """The local files that `path` reads (what the cache keys on); None for a hub dataset id."""
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if is_saved_dataset(path):
        return sorted(os.path.join(root, n) for root, _, names in os.walk(os.path.abspath(path)) for n in names)
    if os.path.isdir(path):
        return [os.path.abspath(f) for f in shard_files(path)]
    return None


def _not_found(path: str) -> bool:
    return bool(os.path.splitext(path)[1]) or path.startswith(("/", ".", "~")) or path.count("/") > 1


# ----------------------------------------------------------------------------------------------- loading

def load_rows(path: str, cache_dir: str | None = None):
    """A local jsonl/json/csv/parquet file, a folder of such shards, a `save_to_disk` folder, or a hub dataset id
    already in the local cache (never the network) -> datasets.Dataset. `cache_dir`: where datasets writes its
    Arrow copy of text files (its default cache when None)."""
    import datasets

    if is_saved_dataset(path):
        ds = _load_saved(path)
    elif os.path.isdir(path) or os.path.isfile(path):
        files = shard_files(path) if os.path.isdir(path) else [path]
        builder = {_check_file(f) for f in files}.pop()
        try:
            with quiet_datasets():
                ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir,
                                           writer_batch_size=ARROW_BATCH_ROWS)
        except Exception as err:  # the readers raise many types; the message below keeps the reader's own
            better = next((m for f in files if builder == "json" and (m := _find_bad_json(f))), None)
            raise UserError(better or f"{path}: cannot read it as {builder}: {str(err).splitlines()[0]}") from err
    elif _not_found(path):
        raise UserError(f"data file {path} not found: check data.path / data.eval_path")
    else:  # owner/name: a hub dataset id
        ds = _load_cached_hub_dataset(path)
    if len(ds) == 0:
        raise UserError(f"{path} has no rows")
    return ds


def stream_rows(path: str):
    """The rows of `path` as a datasets.IterableDataset, read lazily in file order (data.streaming)."""
    import datasets

    if is_saved_dataset(path):
        return _load_saved(path).to_iterable_dataset()
    if os.path.isdir(path) or os.path.isfile(path):
        files = shard_files(path) if os.path.isdir(path) else [path]
        builder = {_check_file(f) for f in files}.pop()
        with quiet_datasets():
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    if _not_found(path):
        raise UserError(f"data file {path} not found: check data.path / data.eval_path")
    return _load_cached_hub_dataset(path).to_iterable_dataset()


def _load_saved(path: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk: "
                        f"point data.path at a jsonl/json/csv/parquet file or such a folder") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path} holds splits {', '.join(ds)} but no 'train' split: save the split you want")
        ds = ds["train"]
    return ds


@contextlib.contextmanager
def quiet_datasets():
    """No "Generating train split" bar and no logged reader error on stderr: a bad file is reported once, as
    our UserError (the CLI's one line), and a good one by the statistics we print."""
    import datasets

    bars_were_on, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_cached_hub_dataset(name: str):
    import datasets
    import huggingface_hub.constants as hub_constants

    from qlora_trainer.base_model import download_command

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as err:  # offline load failures come in many types
        raise UserError(f"data file {name} not found, and no dataset of that name is in the local cache "
                        f"(nothing is downloaded at run time): use a local file, or download it first with "
                        f"`{download_command(name, dataset=True)}`") from err
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
