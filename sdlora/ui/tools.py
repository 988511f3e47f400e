"""The other jobs of the page, each a call of the library function its command runs: inspect a LoRA file, list the
LoRA files of a folder, convert a file between formats, merge LoRAs into a model. Every path is resolved under the
UI's roots first; a problem is the command's own one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.files import read_lora, write_lora
from ..core.formats import detect_format
from ..core.inspection import describe, to_json
from ..errors import UserError
from ..inference.merge import MergeStats, merge_model
from ..models.loading import BUILTIN_MODELS
from ..storage.output_rules import check_output_file
from ..storage.safetensors_stream import read_header
from .roots import Roots

LORA_SUFFIXES = (".safetensors",)
MAX_LISTED = 500  # LoRA files one listing reads
TRIGGER_WORDS = 5  # tags shown per file


def inspect_lora(path: str, roots: Roots) -> dict[str, Any]:
    """What `sdlora inspect --json` prints for the file."""
    real = roots.resolve(path, "file")
    return json.loads(to_json(describe(read_lora(real), real)))


def list_loras(folder: str, roots: Roots) -> dict[str, Any]:
    """Each LoRA file under `folder` (and its subfolders) with the inspect summary, or the line that says why it
    cannot be read; `.safetensors` files of no LoRA format (a checkpoint's optimizer state, a model) are only counted."""
    real = roots.resolve(folder, "folder")
    if not real.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    listed, other = [], 0
    for path in sorted(p for p in real.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())[:MAX_LISTED]:
        if not roots.contains(path.resolve()):  # a symlink out of the roots is not read
            continue
        entry: dict[str, Any] = {"path": str(path), "name": str(path.relative_to(real))}
        try:
            detect_format(read_header(path).tensors)
        except UserError:
            other += 1
            continue
        try:
            info = inspect_lora(str(path), roots)
            entry.update({key: info[key] for key in ("format", "architecture", "modules", "rank", "alpha", "size_bytes")})
            entry["kinds"] = sorted(info["adapter_kinds"])
            entry["trigger_words"] = _trigger_words(info["metadata"])
        except (UserError, OSError, ValueError) as err:
            entry["error"] = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        listed.append(entry)
    return {"loras": listed, "other_files": other}


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    """The most frequent tags of kohya's `ss_tag_frequency` (the words the LoRA was trained with), the first few."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    counts: dict[str, int] = {}
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, int):
                counts[tag] = counts.get(tag, 0) + count
    return [tag for tag, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TRIGGER_WORDS]]


def convert_lora(source: str, output: str, to: str, roots: Roots) -> dict[str, Any]:
    """`sdlora convert SOURCE OUTPUT --to TO`: the file written and its module count."""
    if to not in ("diffusers", "kohya"):
        raise UserError(f"to {to!r} is invalid: it must be diffusers or kohya")
    real_source = roots.resolve(source, "input")
    real_output = roots.resolve(output, "output")
    check_output_file(real_output, [real_source], "output")
    state = read_lora(real_source)
    written = write_lora(state, real_output, to)
    return {"output": str(written), "modules": len(state), "format": to}


def merge_loras(model: str, loras: list[dict[str, Any]], output: str, roots: Roots) -> dict[str, Any]:
    """`sdlora merge --model MODEL --lora FILE:SCALE... --out OUTPUT`: the folder written and what was merged."""
    if not isinstance(loras, list) or not loras:
        raise UserError("give at least one LoRA file to merge")
    real_model = model if model in BUILTIN_MODELS and not (roots.home / model).exists() else str(roots.resolve(model, "model"))
    specs = []
    for entry in loras:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UserError('each LoRA is {"path": FILE, "scale": NUMBER}')
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise UserError(f"the scale of {entry['path']} must be a number, got {scale!r}")
        specs.append((str(roots.resolve(entry["path"], "LoRA")), float(scale)))
    stats = MergeStats()
    out = merge_model(real_model, specs, out_dir=roots.resolve(output, "output"), stats=stats)
    return {"output": str(Path(out)), "modules": stats.modules, "tensors": stats.tensors}
