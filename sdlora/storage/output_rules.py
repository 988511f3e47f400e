"""The one rule for every command that writes: an output never costs the user anything.

An output may replace only what sdlora itself wrote, and never a path equal to, containing or inside one of the
command's inputs. Every command checks its output here before any work starts, so a refusal is one line and leaves
nothing behind. What counts as sdlora's own:
- a folder: one holding the `.sdlora` marker (written into every folder sdlora writes whole: merged and built-in
  models, training runs), or one in the layout sdlora wrote before markers existed (a diffusers model folder with
  nothing but its parts; a run folder with its `config.toml` and `metrics.jsonl`);
- a file: a .safetensors file whose header metadata carries `sdlora_version`.
An empty folder and a path that does not exist are always fine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from .atomic import TMP_PREFIX, check_writable_target
from .safetensors_stream import read_header

MARKER_FILE = ".sdlora"  # in every folder sdlora writes whole; JSON naming the command and version
WRITTEN_BY_KEY = "sdlora_version"  # in the header metadata of every .safetensors file sdlora writes
RUN_FILES = ("config.toml", "metrics.jsonl")  # a training run's folder from before the marker


def write_marker(folder: str | os.PathLike, command: str, version: str) -> None:
    """Mark `folder` as written by sdlora's `command` at `version` (a later run may replace it)."""
    text = json.dumps({"written_by": "sdlora", "command": command, "version": version}) + "\n"
    (Path(folder) / MARKER_FILE).write_text(text, encoding="utf-8")


def is_sdlora_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a .safetensors file sdlora wrote (its header metadata says so)."""
    try:
        metadata = read_header(path).metadata or {}
    except (OSError, ValueError):
        return False
    return WRITTEN_BY_KEY in metadata


def is_sdlora_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder sdlora wrote whole: a marker, or a model or run folder of sdlora's own layout."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        return True
    return _is_bare_model_folder(path) or all((path / name).is_file() for name in RUN_FILES)


def _is_bare_model_folder(path: Path) -> bool:
    """A diffusers pipeline folder holding nothing but `model_index.json` and the parts it names."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict):
        return False
    parts = {name for name, value in index.items() if isinstance(value, list)}
    return all(entry.name == "model_index.json" or entry.name in parts or entry.name.startswith(TMP_PREFIX) for entry in path.iterdir())


def _existing(inputs: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The inputs that are paths on disk (hub ids and built-in model names are not), resolved."""
    found = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = Path(item).expanduser()
        if path.exists():
            found.append(path.resolve())
    return found


def _check_against_inputs(out: Path, inputs: Iterable[str | os.PathLike | None], option: str, *, containing: bool) -> None:
    """Refuse an output equal to or inside an input (and, with `containing`, one that holds an input)."""
    target = out.expanduser().resolve()
    for source in _existing(inputs):
        if target == source:
            raise UserError(f"{option} {out} is the input {source}: writing there would replace it; choose another path")
        if source.is_dir() and target.is_relative_to(source):
            raise UserError(f"{option} {out} is inside the input {source}: write the output elsewhere")
        if containing and source.is_relative_to(target):
            raise UserError(f"{option} {out} holds the input {source}, which writing there would replace: choose another folder")


def check_output_file(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "--out") -> Path:
    """A file output: not an input, not inside an input folder; an existing file only if sdlora wrote it."""
    out = check_writable_target(out)
    _check_against_inputs(out, inputs, option, containing=False)
    if out.exists() and not is_sdlora_file(out):
        raise FileExistsError(f"{option} {out} already exists and was not written by sdlora: remove it yourself or choose another name")
    return out


def check_output_folder(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "--out") -> Path:
    """A folder output written whole (replacing an old one): not holding, equal to or inside an input; an existing
    non-empty folder only if sdlora wrote it."""
    out = check_writable_target(out, is_dir=True)
    _check_against_inputs(out, inputs, option, containing=True)
    if out.is_dir() and any(out.iterdir()) and not is_sdlora_folder(out):
        raise FileExistsError(f"{option} {out} is a folder of other files, which writing there would delete: choose a new or empty folder")
    return out


def check_run_folder(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "--output", resume: bool = False
) -> Path:
    """A training run's folder: files are written into it by name, so it must be new, empty, or an sdlora run."""
    out = check_writable_target(out, is_dir=True)
    _check_against_inputs(out, inputs, option, containing=True)
    if out.is_dir() and any(out.iterdir()) and not is_sdlora_folder(out):
        what = "resume only from a training run's folder" if resume else "choose a new or empty folder"
        raise FileExistsError(
            f"{option} {out} holds other files, which a run's config.toml, README.md and metrics.jsonl would replace: {what}"
        )
    return out


def check_image_folder(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "--out") -> Path:
    """A folder images are added to (never replacing a file): it may hold anything, but not be or sit inside an input."""
    out = check_writable_target(out, is_dir=True)
    _check_against_inputs(out, inputs, option, containing=False)
    return out
