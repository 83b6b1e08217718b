"""One training run per output folder.

`OUT/.lock` holds the pid (and host) of the run that writes into OUT, and that run holds an exclusive
`fcntl.flock` on it. The kernel drops a flock the moment its process ends, however it ends (SIGKILL, OOM
kill, power loss of the process), so a killed run never leaves the folder stuck: the next run finds the file,
takes the lock and writes its own pid. We use the lock, not pid liveness, to decide: a pid can be reused by an
unrelated process, a flock cannot outlive its holder. The pid in the file is only for the message.

Under `accelerate launch` every process of one run trains into the same OUT: only global rank 0 takes the lock, and
train.Run hands the outcome to the other ranks (distributed.World.main_does), so a refusal stops all of them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from qlora_trainer.errors import UserError

LOCK_FILE = ".lock"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown pid"
    except OSError:
        return "unknown pid"


def _busy(path: Path) -> UserError:
    return UserError(f"{path}: another training run ({_holder(path)}) is writing into {path.parent}: wait for it "
                     "to finish, or choose another out (the lock goes away by itself when that process ends)")


def _try_flock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise UserError(f"{path}: cannot lock the output folder ({err.strerror}): is it on a filesystem without "
                        "file locks? choose an out on a local disk") from None


def check_free(out: str | os.PathLike) -> None:
    """UserError if a live run holds OUT. Creates nothing (called before anything heavy is loaded)."""
    path = Path(out) / LOCK_FILE
    if not _is_main_process() or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # removed meanwhile, or unreadable: acquire() decides
    try:
        if not _try_flock(fd, path):
            raise _busy(path)
    finally:
        os.close(fd)  # closing drops the probe's lock


class RunLock:
    """`with RunLock(out) as lock: ...; lock.acquire()`: acquire() creates OUT and locks it; leaving the block
    releases the lock (so does the end of the process)."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not _is_main_process() or self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_flock(fd, self.path):
                raise _busy(self.path)
            os.ftruncate(fd, 0)  # a stale pid from a killed run is replaced by ours
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # drops the flock; the file stays (removing it would race with a run taking it now)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
