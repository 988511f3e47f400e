"""Atomic outputs: write to a temporary name in the destination folder, then rename into place.

A crash or a full disk leaves either the old file or none, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".sdlora-tmp-"


def check_writable_target(path: str | os.PathLike, *, is_dir: bool = False) -> Path:
    """Raise a one-line error if `path` cannot become a new output (parent missing/unwritable, wrong kind)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if is_dir and path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} is an existing file, expected a folder")
    if not is_dir and path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder, expected a file name")
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {parent} is a file")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to folder {parent}: permission denied")
    return path


MIN_FREE_BYTES = 1 << 20  # a write that failed with less free space than this failed for want of space


@contextlib.contextmanager
def _name_the_output(path: Path) -> Iterator[None]:
    """Errors while writing name the output, not its temporary name; a full disk is always an ENOSPC OSError.

    Writers that are not plain Python file writes (torch.save's zip writer, safetensors' Rust writer) report a
    full disk as RuntimeError or their own error type; a failed write on a disk with under 1 MiB free is one.
    """
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    except Exception as err:
        if _free_bytes(path.parent) < MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def _free_bytes(folder: Path) -> int:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return MIN_FREE_BYTES
    return stats.f_bavail * stats.f_frsize


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`."""
    path = check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _name_the_output(path):
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the mode a plain open() would give
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old folder is removed)."""
    path = check_writable_target(path, is_dir=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.parent))
    try:
        with _name_the_output(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftover_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files and folders a killed process left under `folder` (any depth).

    Only for folders one process owns while it runs (a training run's output folder): a temporary name there is
    never a live write of someone else's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob(TMP_PREFIX + "*"), key=lambda p: len(p.parts)):  # outermost first
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)  # also fine when it sat in a folder removed just before
