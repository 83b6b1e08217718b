"""Folders and files that appear whole or not at all (adapters, checkpoints, merged models, config.yaml, plots).

Everything is written into a temporary sibling folder; each file and the folder are fsynced, then it is
renamed into place and the parent is fsynced. A reader that finds the final name finds a complete folder;
a crash leaves at most a `.tmp-*` sibling, never a half-written final folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from qlora_trainer import libc
from qlora_trainer.errors import UserError

TMP_PREFIX = ".tmp-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what a full disk or quota raises


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (safetensors and torch.save files carry no checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file(final: Path, write: Callable[[Path], None]) -> Path:
    """The single-file form of write_folder: write(tmp) on a temporary sibling, fsync it, rename it over `final`
    and fsync the folder. A reader finds the old file or the new one, never part of one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_text(final: Path, text: str) -> Path:
    """write_file for a text file (UTF-8)."""
    return write_file(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder(final: Path, write: Callable[[Path], None], expected_bytes: int | None = None) -> Path:
    """Call write(tmp) on a fresh temporary sibling of `final`, make it durable, then put it in place of
    `final` (an existing `final` folder is replaced only now). On any failure the temporary folder is removed
    and `final` is untouched. Callers decide beforehand whether an existing `final` may be replaced.

    A full disk or quota (ENOSPC, EDQUOT) becomes a UserError saying how much space the folder needs
    (`expected_bytes`, else at least what was written before the disk filled) and how much is free."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_folder(final)
    try:
        write(tmp)
        _plain_modes(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        _put_in_place(tmp, final)
        fsync_path(final.parent)
    except OSError as err:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in DISK_FULL:
            raise disk_full_error(final, err, expected_bytes, written) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _make_temp_folder(final: Path) -> Path:
    """A new empty sibling `.tmp-NAME-RANDOM-PID` of `final`, made by a plain mkdir, so that it (and `final` after
    the rename) has the mode the user's umask gives a folder; tempfile.mkdtemp would make it 0700."""
    for _ in range(100):
        tmp = final.parent / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}-{os.getpid()}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary folder name", str(final.parent))


def _plain_modes(tmp: Path) -> None:
    """Give everything under `tmp` the mode a plain mkdir/open gives under the umask (read off `tmp` itself, made
    by mkdir): a file copied with its source's mode (shutil.copy2, a read-only hub cache) gets it too."""
    folder_mode = tmp.stat().st_mode & 0o777
    file_mode = folder_mode & 0o666
    for path in tmp.rglob("*"):
        if path.is_symlink():
            continue
        wanted = folder_mode if path.is_dir() else file_mode
        if path.stat().st_mode & 0o777 != wanted:
            os.chmod(path, wanted)


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder`; a file gone meanwhile (removed by another process) counts 0."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def disk_full_error(target: Path, err: OSError, expected_bytes: int | None = None, written: int = 0) -> UserError:
    """The one-line message for a write into `target` that ran out of disk space or quota."""
    target = Path(target)
    needed = (f"it needs about {human_bytes(expected_bytes)}" if expected_bytes
              else f"it needs more than the {human_bytes(written)} written before the disk filled")
    try:
        free = f"{human_bytes(shutil.disk_usage(_existing_parent(target)).free)} free there"
    except OSError:
        free = "free space unknown"
    what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on the device"
    return UserError(f"{target}: {what} while writing {err.filename or target} ({needed}, {free}); "
                     f"nothing was put in place of {target.name} (anything there before is intact): free up space "
                     "or write somewhere else")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_stale_temp(path: Path) -> bool:
    """A temporary folder left behind by another process that has ended. The name ends in its writer's pid; a
    folder of a live process (another writer: a rank of a multi-process run that wrongly writes too, a second
    tool) is not ours to delete. A reused pid only keeps a leftover for a later run to remove."""
    if not path.name.startswith(TMP_PREFIX):
        return False
    pid = path.name.rpartition("-")[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return not pid.isdigit()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _put_in_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    # A folder cannot be renamed over a non-empty folder. Swap the two atomically where the OS can (Linux
    # renameat2 RENAME_EXCHANGE), so that `final` is always complete, old or new; else two renames.
    if _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the old folder
        return
    old = tmp.with_name(".old-" + tmp.name[len(TMP_PREFIX):])
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    return libc.rename_exchange(a, b)
