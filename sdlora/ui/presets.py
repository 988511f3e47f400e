"""Presets of the training form: the form saved as the config.toml `sdlora train --config` reads (written under a
root, or downloaded), and such a file (under a root, or uploaded) read back into the form's options.

A preset is `to_toml` of the checked form, so `sdlora train --config PRESET` resolves to the TrainConfig the form
would have started; reading one is `load_toml`'s own parsing (`toml_options`), so a file the CLI accepts fills the
form and a file it refuses is refused with the same line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..storage.atomic import atomic_file
from ..training.config import to_toml, toml_options
from .options import FORM_HIDDEN, check_options
from .roots import Roots

PRESET_HEADER = "# sdlora ui preset: run it as sdlora train --config THIS_FILE\n"  # marks a file the UI may replace
PRESET_SUFFIX = ".toml"
MAX_PRESET = 1 << 20  # characters of an uploaded preset
LISTED_DEPTH = 3  # folders below a root searched for presets to pick (a dataset's train.toml, presets/x.toml, runs/r/config.toml)
MAX_LISTED = 200


def preset_text(options: Any, roots: Roots) -> str:
    """The checked form as a preset's text (paths absolute: the file works from any folder)."""
    return PRESET_HEADER + to_toml(check_options(options, roots))


def save_preset(path: str, options: Any, roots: Roots) -> dict[str, Any]:
    """Write the form's preset to `path` under the roots (a .toml; an existing file only if it is a preset the UI wrote)."""
    text = preset_text(options, roots)  # checked first: a refused form writes nothing
    real = _preset_path(path, roots)
    if real.exists() and not _is_preset(real):
        raise FileExistsError(f"{path} already exists and is not a preset this UI wrote: choose another name")
    with atomic_file(real) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return {"path": str(real), "toml": text}


def load_preset(path: str, roots: Roots) -> dict[str, Any]:
    """The form's options from a config.toml under the roots (relative paths relative to it, as `--config` reads them)."""
    real = _preset_path(path, roots)
    if not real.is_file():
        raise FileNotFoundError(f"preset not found: {path}")
    return {"path": str(real)} | _form_options(toml_options(real.read_text(encoding="utf-8"), real))


def parse_preset(text: Any, name: Any, roots: Roots) -> dict[str, Any]:
    """The form's options from an uploaded config.toml's text, read as if it lay in the first root (its relative
    paths relative to that root, as the form's are)."""
    if not isinstance(text, str) or len(text) > MAX_PRESET:
        raise UserError(f"the preset must be the text of a TOML file of at most {MAX_PRESET} characters")
    label = Path(name).name if isinstance(name, str) and name else "preset.toml"
    return _form_options(toml_options(text, roots.home / label))


def list_presets(roots: Roots) -> list[str]:
    """The .toml files the page offers to load: those in each root and up to `LISTED_DEPTH` folders below it (hidden
    folders, such as the UI's state, left out), relative to the first root where they lie under it, at most `MAX_LISTED`."""
    found: list[str] = []
    for root in roots.folders:
        for folder, subfolders, files in os.walk(root):
            depth = len(Path(folder).relative_to(root).parts)
            subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")) if depth < LISTED_DEPTH else []
            for name in sorted(files):
                path = Path(folder) / name
                if name.lower().endswith(PRESET_SUFFIX) and roots.contains(Path(os.path.realpath(path))):
                    found.append(path.relative_to(roots.home).as_posix() if path.is_relative_to(roots.home) else str(path))
                    if len(found) >= MAX_LISTED:
                        return found
    return found


def _form_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options`: what the form shows, as read; `left_out`: the options it has no field for (`resume`: the page's own
    button), which the page names."""
    shown = {key: value for key, value in options.items() if key not in FORM_HIDDEN}
    return {"options": shown, "left_out": sorted(set(options) - set(shown))}


def _preset_path(path: str, roots: Roots) -> Path:
    real = roots.resolve(path, "preset")
    if real.suffix.lower() != PRESET_SUFFIX:
        raise UserError(f"preset {path} must be a {PRESET_SUFFIX} file")
    return real


def _is_preset(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline() == PRESET_HEADER
    except (OSError, UnicodeDecodeError):
        return False
