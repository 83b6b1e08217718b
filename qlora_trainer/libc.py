"""The C library, loaded once, for the calls Python does not offer: malloc_trim, mallopt, madvise and renameat2."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_RENAME_EXCHANGE = 2
_M_MMAP_THRESHOLD = -3  # mallopt: allocations at least this large get their own mmap, unmapped again on free
_AT_FDCWD = -100
_MADV_DONTNEED = 4


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


def drop_mapped_pages(folder: str | os.PathLike) -> int:
    """Unmap the pages this process has read from read-only memory-mapped files under `folder` (madvise
    MADV_DONTNEED), keeping the mappings. RSS counts every page of a mapped file a process has touched, until it
    unmaps the file: reading a memory-mapped Arrow cache from end to end would show the whole file as resident
    memory. The pages stay in the page cache, so the next read is a page-table fault, not a disk read, and the
    contents are the file's (nothing was written through a read-only mapping). -> the bytes of mappings dropped;
    0 where the OS has no /proc/self/maps or the C library no madvise."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None:
        return 0
    prefix = os.path.join(os.path.realpath(folder), "")
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    dropped = 0
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode path
        if len(fields) < 6 or not fields[5].startswith(prefix) or "w" in fields[1]:
            continue
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the OS or the filesystem cannot:
    then nothing moved, and the caller falls back."""
    renameat2 = getattr(_libc(), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
