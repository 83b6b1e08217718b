"""The C library, loaded once, for the two calls Python does not offer: malloc_trim and renameat2."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # no C library we can open: neither call is available
        return None


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks for reuse; after each streamed tensor the
    heap is full of holes the size of a weight, and resident memory creeps up by a large fraction of the model.
    A no-op where the C library has no malloc_trim (macOS, musl)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the OS or the filesystem cannot:
    then nothing moved, and the caller falls back."""
    renameat2 = getattr(_libc(), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
