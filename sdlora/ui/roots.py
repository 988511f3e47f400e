"""The folders the UI may read and write (`--root`): every path a request names is resolved (relative to the first
root, `..` and symlinks followed) and refused unless it lies under one of them."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


class OutsideRoots(UserError):
    """A path that is not under any of the UI's folders (the server answers 403 and reads nothing)."""


class Roots:
    """The UI's folders, each resolved once at start."""

    def __init__(self, folders: list[str | os.PathLike]) -> None:
        resolved = []
        for folder in folders:
            path = Path(folder).expanduser()
            if not path.is_dir():
                raise UserError(f"--root {folder} is not a folder")
            resolved.append(Path(os.path.realpath(path)))
        if not resolved:
            raise UserError("give at least one --root folder")
        self.folders = resolved

    @property
    def home(self) -> Path:
        """The first root: relative paths are relative to it."""
        return self.folders[0]

    def resolve(self, value: str | os.PathLike, label: str = "path") -> Path:
        """`value` as a real path (relative to the first root, `..` and every symlink resolved) when it lies under a
        root; OutsideRoots otherwise. The path need not exist (an output folder)."""
        text = os.fspath(value)
        if not text or "\x00" in text:
            raise OutsideRoots(f"{label} {text!r} is not a path under the UI's folders")
        path = Path(text).expanduser()
        real = Path(os.path.realpath(path if path.is_absolute() else self.home / path))
        if not self.contains(real):
            raise OutsideRoots(
                f"{label} {text} is outside the UI's folders ({', '.join(map(str, self.folders))}): start sdlora ui with --root for it"
            )
        return real

    def contains(self, real: Path) -> bool:
        """Whether the resolved path `real` is a root or lies under one."""
        return any(real == root or root in real.parents for root in self.folders)
