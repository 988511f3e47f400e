"""Atomic outputs: write to a temporary name in the destination folder, then rename into place.

A crash or a full disk leaves either the old file or none, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
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
    full disk as RuntimeError or their own error type. Such an error is a full disk when an ENOSPC stands anywhere
    in it (an OSError's errno in its chain, or Rust's "No space left on device (os error 28)" in its text), or when
    the disk has less free space than this write had written so far plus 1 MiB (a writer that gave up halfway).
    """
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    except Exception as err:
        if _names_enospc(err) or _free_bytes(path.parent) < _written_bytes(path) + MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def _names_enospc(err: BaseException) -> bool:
    """Whether an error, or one in its cause/context chain, is ENOSPC: by errno, or by the OS's words for it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(err) or f"os error {errno.ENOSPC})" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _written_bytes(path: Path) -> int:
    """The bytes this process's temporaries for `path` hold now (the write that just failed)."""
    total = 0
    for entry in path.parent.glob(glob.escape(_tmp_prefix(path)) + "*"):
        files = [entry] if not entry.is_dir() else [p for p in entry.rglob("*") if not p.is_dir()]
        for file in files:
            with contextlib.suppress(OSError):
                total += file.lstat().st_size
    return total


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


def _tmp_prefix(path: Path, old: bool = False) -> str:
    """`.sdlora-tmp-[old-]<pid>-<name>-`: the process and the output a temporary belongs to, so the next write to the
    same output can tell a dead process's leftovers from a live write."""
    return f"{TMP_PREFIX}{'old-' if old else ''}{os.getpid()}-{path.name[:100]}-"


_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(?P<old>old-)?(?P<pid>\d+)-(?P<name>.*)-[^-]*$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or a platform without signals: assume it lives
        return True
    return True


def recover_output(path: str | os.PathLike) -> None:
    """Before writing `path`: put back an old folder a killed replace had moved aside (when `path` is missing), and
    delete the temporaries dead processes left for `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in sorted(path.parent.glob(TMP_PREFIX + "*")):
        match = _TMP_NAME.match(entry.name)
        if match is None or match["name"] != path.name[:100] or _process_alive(int(match["pid"])):
            continue
        _restore_or_remove(entry, path, bool(match["old"]))


def _restore_or_remove(entry: Path, path: Path, old: bool) -> None:
    if old and (entry / "x").exists() and not path.exists() and not path.is_symlink():
        os.replace(entry / "x", path)  # the kill came between moving the old folder aside and the new one in
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`."""
    path = check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_output(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=path.suffix, dir=path.parent)
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
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old folder is removed).

    The old folder is moved aside before the new one moves in; a kill between the two renames leaves it under a
    temporary name, and the next write to `path` (`recover_output`) puts it back."""
    path = check_writable_target(path, is_dir=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_output(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        with _name_the_output(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path, old=True), dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftover_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files and folders a killed process left under `folder` (any depth), first putting back
    any old folder a killed replace had moved aside.

    Only for folders one process owns while it runs (a training run's output folder): a temporary name there is
    never a live write of someone else's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob(TMP_PREFIX + "*"), key=lambda p: len(p.parts)):  # outermost first
        match = _TMP_NAME.match(path.name)
        old = match is not None and bool(match["old"])
        # a missing path (it sat in a folder removed just before) is fine for both removals
        _restore_or_remove(path, path.parent / match["name"] if old else path, old)
