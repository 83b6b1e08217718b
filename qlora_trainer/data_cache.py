"""The token cache: a tokenized dataset is written once and reused while nothing that changes its tokens changed.

The key hashes the data files (content up to CONTENT_HASH_LIMIT bytes a file, past that size + mtime + the first
and last MiB), the tokenizer (its vocabulary, merges, special tokens, chat template), every data.* setting that
changes the tokens, the seed (the eval split) and the source of the pipeline's own modules, so an edit to any of
them is a new key and never a stale hit.

An entry is a folder `<root>/<key>` written as a `.tmp-*` sibling and renamed into place: a run killed while
writing leaves a temporary folder that no later run reads (and removes when it is old). The root is data.cache_dir,
else `.qlora-cache` beside the data, else (a read-only data folder, a hub id) the user's cache folder.

An entry records what it was built from (KEY_FILE). A new entry removes the entries no run can be served again:
those of another version of the pipeline (its code is part of the key), and those of the same data path built from
contents the path no longer has. Entries of other data, or of other settings of the same data, stay."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from qlora_trainer import atomic
from qlora_trainer.data_sources import source_files

CACHE_FOLDER = ".qlora-cache"
CONTENT_HASH_LIMIT = 1 << 30  # bytes: files up to this size are hashed whole
DONE_FILE = "stats.json"  # written last in an entry
KEY_FILE = "key.json"  # the parts of an entry's key and the data path it was built from
KEY_LENGTH = 24  # hex digits of a key: the name of an entry folder
STALE_TMP_SECONDS = 24 * 3600
PIPELINE_MODULES = ("data.py", "data_arrow.py", "data_batches.py", "data_sources.py", "data_cache.py", "packing.py")


def cache_root(data_path: str, cache_dir: str | None) -> Path:
    """Where entries for `data_path` live (see the module docstring)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.path.exists(data_path):
        beside = Path(os.path.abspath(data_path)).parent / CACHE_FOLDER
        if os.access(beside if beside.exists() else beside.parent, os.W_OK):
            return beside
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "qlora-trainer" / "data"


def _file_digest(path: str, digest) -> None:
    st = os.stat(path)
    digest.update(f"{path}\0{st.st_size}\0".encode())
    with open(path, "rb") as fh:
        if st.st_size <= CONTENT_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
            return
        digest.update(f"{st.st_mtime_ns}\0".encode() + fh.read(1 << 20))
        fh.seek(-(1 << 20), os.SEEK_END)
        digest.update(fh.read())


def data_digest(path: str) -> str:
    """A hash of what `path` holds: its files' bytes, or a cached hub dataset's own fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    files = source_files(path)
    if files is None:
        from qlora_trainer.data_sources import load_rows

        digest.update(load_rows(path)._fingerprint.encode())
    else:
        for f in files:
            _file_digest(f, digest)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes token ids: the fast tokenizer's full JSON (vocabulary,
    normalizer, pre-tokenizer, merges, post-processor, added tokens), or a slow one's vocabulary, plus the special
    tokens and the chat template."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
             "chat_template": getattr(tokenizer, "chat_template", None),
             "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def code_digest() -> str:
    """A hash of the pipeline's own source: a change to how rows become tokens is a new key."""
    digest = hashlib.blake2b(digest_size=8)
    here = Path(__file__).parent
    for name in PIPELINE_MODULES:
        if (here / name).is_file():
            digest.update((here / name).read_bytes())
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=KEY_LENGTH // 2).hexdigest()


def cached_entry(root: Path, parts: dict, source: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """(the entry folder of `parts`, True when it was reused). `build(tmp)` fills a temporary folder, which must end
    with DONE_FILE; KEY_FILE (`parts` and the data path `source`) is added and the folder renamed into place.
    Another process that finished the same key first wins: ours goes."""
    key = cache_key(parts)
    final = root / key
    if (final / DONE_FILE).is_file():
        return final, True
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root / f"{atomic.TMP_PREFIX}{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # bad data leaves the user's folder as it was
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    try:
        if not (tmp / DONE_FILE).is_file():
            raise RuntimeError(f"cache build for {key} wrote no {DONE_FILE}")
        (tmp / KEY_FILE).write_text(json.dumps({"parts": parts, "source": source}, sort_keys=True))
        if final.exists() and not (final / DONE_FILE).is_file():
            shutil.rmtree(final, ignore_errors=True)  # a folder left by another tool: never trusted
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / DONE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def remove_unusable(root: Path, keep: Path, parts: dict, source: str) -> tuple[int, int]:
    """Remove the entries under `root` that no run can be served again (see the module docstring); an entry
    without a KEY_FILE predates them, so it is another version's. Only complete entries (a key for a name, a
    DONE_FILE inside) are ever touched. -> (entries removed, bytes freed)."""
    removed, freed = 0, 0
    for entry in root.iterdir():
        if entry == keep or not _is_entry(entry):
            continue
        try:
            recorded = json.loads((entry / KEY_FILE).read_text())
            theirs = recorded["parts"]
            unusable = theirs["code"] != parts["code"] or (recorded["source"] == source and
                                                           theirs["data"] != parts["data"])
        except (OSError, ValueError, KeyError, TypeError):
            unusable = True
        if unusable:
            size = atomic.folder_bytes(entry)  # 0 for files another rank removed meanwhile
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed, freed = removed + 1, freed + size
    return removed, freed


def _is_entry(path: Path) -> bool:
    name = path.name
    return (len(name) == KEY_LENGTH and all(c in "0123456789abcdef" for c in name) and path.is_dir()
            and (path / DONE_FILE).is_file())


def _remove_stale_temps(root: Path) -> None:
    """Temporary folders of runs that died while writing (a day old: a live build is never that slow)."""
    now = time.time()
    for p in root.glob(f"{atomic.TMP_PREFIX}*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
