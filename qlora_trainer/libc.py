"""The C library, loaded once, for the calls Python does not offer: malloc_trim, mallopt and renameat2."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_RENAME_EXCHANGE = 2
_M_MMAP_THRESHOLD = -3  # mallopt: allocations at least this large get their own mmap, unmapped again on free
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


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of `nbytes` or more with its own mmap, returned to the OS when freed (glibc mallopt
    M_MMAP_THRESHOLD). glibc's default threshold moves: each freed mmapped block raises it to that block's size (up to
    32 MiB), after which blocks that large come from the heap, whose free space is kept for reuse. In training on the
    CPU every 4-bit linear dequantizes its weight (megabytes) in each forward and backward: with the moving threshold
    those blocks pile up in the heap and a step's peak grows by hundreds of MiB of freed memory (see
    host_memory.py). A fixed threshold also stops the moving. False where the C library has no mallopt (not glibc)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the OS or the filesystem cannot:
    then nothing moved, and the caller falls back."""
    renameat2 = getattr(_libc(), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
