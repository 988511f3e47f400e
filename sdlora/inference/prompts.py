"""A1111's LoRA prompt syntax: `<lora:NAME:WEIGHT>` tags in a prompt, taken out of the text and looked up by file stem.

As A1111's extra-networks parser: a tag is `<lora:` then fields split by `:` up to `>`; the first is the name, the
second the weight (1 when left out, as A1111 does). A third positional field (A1111's separate UNet weight) and
named fields (`te=`, `unet=`, `dyn=`) are refused, naming the tag: one weight applies to every component here.
The tags are removed from the prompt before it reaches the text encoder, with the comma or space they leave
behind, so `a cat, <lora:ink:0.8>, dusk` is encoded as `a cat, dusk`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<lora:[^<>]*>", re.IGNORECASE)
# what a LoRA file may be called in a --lora-dir (the formats core.files reads; pickles still need --allow-pickle)
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# the largest |weight| a LoRA is applied at: A1111's weights stay within a few units; 1e30 makes NaN images, not art
MAX_LORA_WEIGHT = 100.0


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:name:weight>` tag: the name as written and its weight."""

    text: str
    name: str
    weight: float


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` tags, and the tags in order. A malformed tag raises a one-line ValueError."""
    tags = [_parse_tag(match.group(0), match.group(1)) for match in LORA_TAG.finditer(prompt)]
    if not tags:
        return prompt, []
    pieces = _ANY_TAG.split(prompt)
    # a removed tag takes the separators beside it: "a, <lora:x:1>, b" -> "a, b"; "<lora:x:1> a" -> "a"
    kept: list[str] = []
    comma = False  # a comma stood next to a tag since the last piece kept
    for index, piece in enumerate(pieces):
        if index > 0:  # a tag stood before this piece
            piece = piece.lstrip()
            if piece.startswith(","):
                comma, piece = True, piece[1:].lstrip()
        trailing = False
        if index < len(pieces) - 1:  # a tag stands after it
            piece = piece.rstrip()
            if piece.endswith(","):
                trailing, piece = True, piece[:-1].rstrip()
        if piece:
            if kept:
                kept.append(", " if comma else " ")
            kept.append(piece)
            comma = False
        comma = comma or trailing
    return "".join(kept), tags


def _parse_tag(text: str, inner: str) -> LoraTag:
    fields = inner.split(":")
    name = fields[0].strip()
    if not name:
        raise UserError(f"{text}: the tag names no LoRA; write <lora:NAME:WEIGHT>")
    if len(fields) > 2 or any("=" in field for field in fields[1:]):
        raise UserError(f"{text}: only <lora:NAME:WEIGHT> is supported (one weight for the UNet and text encoders alike)")
    if len(fields) == 1:
        return LoraTag(text, name, 1.0)  # A1111's default weight
    try:
        weight = float(fields[1])
    except ValueError:
        raise UserError(f"{text}: the weight {fields[1]!r} is not a number; write <lora:{name}:0.8>") from None
    return LoraTag(text, name, check_lora_weight(weight, text))


def check_lora_weight(weight: float, where: str) -> float:
    """`weight` if it is a finite number within +-MAX_LORA_WEIGHT, else a one-line ValueError naming `where`."""
    if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
        raise UserError(
            f"{where}: a LoRA weight must be a finite number between -{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}, got {weight:g}"
        )
    return weight


def lora_files(lora_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """{file stem: paths} of the LoRA files in `lora_dir` and its subfolders (A1111 looks through subfolders too)."""
    root = Path(lora_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--lora-dir {lora_dir}: no such folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def find_lora_file(tag: LoraTag, lora_dir: str | os.PathLike | None, files: dict[str, list[Path]] | None = None) -> Path:
    """The file a tag names: the file in `lora_dir` (or below) whose stem is the name (exactly, else ignoring case),
    the one nearest `lora_dir` where several are (a training run's folder holds its checkpoints' copies below it).

    No folder, no such file, or two files of that stem: a one-line ValueError (listing the close names).
    """
    if lora_dir is None:
        raise UserError(f"the prompt holds {tag.text}: pass --lora-dir DIR, the folder to look LoRA files up in by name")
    files = lora_files(lora_dir) if files is None else files
    matches = files.get(tag.name) or [p for stem, paths in files.items() if stem.lower() == tag.name.lower() for p in paths]
    if matches:  # the file nearest the folder: a run's LoRA, not its checkpoints' copies further down
        depth = min(len(p.parts) for p in matches)
        matches = [p for p in matches if len(p.parts) == depth]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{tag.text}: several files in {lora_dir} are named {tag.name!r}: {', '.join(str(p) for p in matches)}; rename one")
    close = difflib.get_close_matches(tag.name, list(files), n=5, cutoff=0.4)
    hint = f"; close matches: {', '.join(close)}" if close else f"; it holds {len(files)} LoRA files"
    raise UserError(f"{tag.text}: no LoRA file named {tag.name!r} in {lora_dir}{hint}")


def prompt_loras(prompt: str, lora_dir: str | os.PathLike | None) -> tuple[str, list[tuple[Path, float, LoraTag]]]:
    """The prompt without tags, and (file, weight, tag) for each `<lora:...>` tag, every tag's file found first."""
    text, tags = split_lora_tags(prompt)
    if not tags:
        return text, []
    files = lora_files(lora_dir) if lora_dir is not None else None
    return text, [(find_lora_file(tag, lora_dir, files), tag.weight, tag) for tag in tags]
