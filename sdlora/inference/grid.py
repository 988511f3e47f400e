"""Comparison grids, as A1111's X/Y plot: one setting varies along X, another along Y, everything else (the seed
first) is the same in every cell, so a cell differs from its neighbours only by its axis values.

The axes are the LoRA weight, the checkpoint (a LoRA file, or a training run's `checkpoints/step-*` folders),
prompt, seed, sampler, steps and guidance. Each cell is exactly the image `generate` makes alone with that cell's
settings and LoRAs: the grid reuses one pipeline, changing LoRA weights in place (the same `set_lora_scales` that
loading ends with) and reloading only when a cell needs other LoRA files. The labelled picture has the axis
labels drawn above and left of the cells, which are pasted edge to edge in its bottom-right corner.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..core.files import LoraFile, open_lora
from ..errors import UserError
from ..storage.steps import step_of
from .adapters import load_lora, loaded_loras, set_lora_scales, unload_loras
from .generation import check_guidance, generate
from .prompts import check_lora_weight, prompt_loras
from .samplers import find_sampler

AXES = ("weight", "checkpoint", "prompt", "seed", "sampler", "steps", "guidance")
_TITLES = {"weight": "Weight", "checkpoint": "Checkpoint", "prompt": "Prompt", "seed": "Seed", "sampler": "Sampler", "steps": "Steps",
           "guidance": "CFG scale"}  # fmt: skip
_DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name, as training writes it
# a checkpoint's raw trainable tensors, RNG states and --ema-decay's averaged tensors (training's checkpoint and ema
# file names), beside its LoRA files: a checkpoint of a --kind without a diffusers file holds the kohya file alone
_NOT_A_LORA = {"trainable.safetensors", "rng.safetensors", "ema.safetensors"}


@dataclass(frozen=True)
class Checkpoint:
    """One LoRA file on the checkpoint axis, with the label the grid shows for it."""

    label: str
    path: Path


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_checkpoints(paths: Sequence[str | os.PathLike]) -> list[Checkpoint]:
    """The LoRA files that `--lora-steps` names: files as given; a folder's `step-*` checkpoints (a run's
    `checkpoints/` folder or the run's own folder), in step order; otherwise the LoRA files in a folder, by name."""
    found: list[Checkpoint] = []
    for entry in map(Path, paths):
        if entry.is_file():
            label = entry.parent.name if entry.name == _DIFFUSERS_LORA and entry.parent.name else entry.stem
            found.append(Checkpoint(_step_label(label), entry))
        elif entry.is_dir():
            found.extend(_folder_checkpoints(entry))
        else:
            raise FileNotFoundError(f"--lora-steps {entry}: no such file or folder")
    return found


def _step_label(name: str) -> str:
    step = step_of(name)
    return name if step is None else f"step {step}"


def _folder_checkpoints(folder: Path) -> list[Checkpoint]:
    root = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    steps = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None), key=lambda p: step_of(p.name))
    if steps:
        return [Checkpoint(_step_label(step.name), _checkpoint_lora(step)) for step in steps]
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors" and p.name not in _NOT_A_LORA),
                   key=lambda p: _natural(p.name))  # fmt: skip
    if not files:
        raise UserError(f"--lora-steps {folder}: no step-* checkpoints and no .safetensors LoRA files in it")
    return [Checkpoint(p.stem, p) for p in files]


def _checkpoint_lora(step: Path) -> Path:
    if (step / _DIFFUSERS_LORA).is_file():
        return step / _DIFFUSERS_LORA
    loras = [p for p in step.glob("*.safetensors") if p.name not in _NOT_A_LORA]
    if len(loras) != 1:
        raise UserError(f"{step}: expected one LoRA .safetensors file in the checkpoint, found {len(loras)}")
    return loras[0]


@dataclass
class GridSpec:
    """What a grid varies and what it keeps: a list of values per axis (one value: the same in every cell)."""

    prompts: list[str]
    weights: list[float] = field(default_factory=lambda: [1.0])
    checkpoints: list[Checkpoint] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    samplers: list[str | None] = field(default_factory=lambda: [None])  # None: the model's own scheduler
    steps: list[int] = field(default_factory=lambda: [20])
    guidance: list[float] = field(default_factory=lambda: [7.5])
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    loras: list[tuple[str | os.PathLike, float]] = field(default_factory=list)  # in every cell, beside the checkpoint
    lora_dir: str | os.PathLike | None = None  # where the prompts' <lora:name:weight> tags are looked up
    x: str | None = None
    y: str | None = None

    def values(self) -> dict[str, list]:
        return {"weight": self.weights, "checkpoint": self.checkpoints or [None], "prompt": self.prompts, "seed": self.seeds,
                "sampler": self.samplers, "steps": self.steps, "guidance": self.guidance}  # fmt: skip

    def check(self) -> tuple[str, str | None]:
        """Raise a one-line ValueError for anything that cannot make a grid; returns the (X, Y) axes."""
        values = self.values()
        for axis, options in values.items():
            if not options:
                raise UserError(f"the {axis} axis has no values")
        if len(self.weights) > 1 and not self.checkpoints:
            raise UserError("--weights sets the weight of the --lora-steps LoRA: give --lora-steps FILE or FOLDER")
        for name in (self.x, self.y):
            if name is not None and name not in AXES:
                raise UserError(f"unknown grid axis {name!r}; the axes are {', '.join(AXES)}")
        if self.x is not None and self.x == self.y:
            raise UserError(f"--x and --y are both {self.x!r}: pick two different axes")
        varied = [axis for axis in AXES if len(values[axis]) > 1]
        chosen = [a for a in (self.x, self.y) if a is not None]
        left = [axis for axis in varied if axis not in chosen]
        free = 2 - len(chosen)
        if len(left) > free:
            raise UserError(
                f"{', '.join(left)} have several values but a grid has two axes{' (' + ', '.join(chosen) + ' chosen)' if chosen else ''}: give one value for the others"
            )
        x = self.x or (left.pop(0) if left else "weight" if self.y != "weight" else "seed")
        y = self.y or (left.pop(0) if left else None)
        for value in self.samplers:
            if value is not None:
                find_sampler(value)
        for steps in self.steps:
            if steps < 1:
                raise UserError(f"steps must be at least 1, got {steps}")
        for weight in self.weights:
            check_lora_weight(weight, "--weights")
        for path, weight in self.loras:
            check_lora_weight(weight, f"--lora {path}")
        for guidance in self.guidance:
            check_guidance(guidance, "--guidance")
        return x, y


@dataclass
class Grid:
    """The cells by row (Y) then column (X), their labels, and the labelled picture."""

    cells: list[list[PILImage.Image]]
    x: str
    y: str | None
    x_labels: list[str]
    y_labels: list[str]
    image: PILImage.Image
    boxes: list[list[tuple[int, int]]]  # each cell's top-left corner in `image`


def _label(axis: str, value) -> str:
    if axis == "checkpoint":
        return value.label if value is not None else "no LoRA"
    if axis == "sampler":
        return value or "model default"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def make_grid(
    pipe,
    spec: GridSpec,
    model_name: str | None = None,
    progress: bool = True,
    resolved_prompts: dict[str, tuple[str, list]] | None = None,
) -> Grid:
    """Generate every cell of the grid (one image each, the seed of the seed axis) and draw the labelled picture.

    `resolved_prompts`: {prompt: `prompt_loras(prompt, spec.lora_dir)`} for prompts already resolved (the CLI does
    it before the model loads); a prompt not in it has its `<lora:...>` tags resolved here.
    """
    x, y = spec.check()
    values = spec.values()
    rows = values[y] if y else [None]
    cells_settings = [[{axis: options[0] for axis, options in values.items()} | {x: xv} | ({y: yv} if y else {}) for xv in values[x]]
                      for yv in rows]  # fmt: skip
    prompts = resolve_prompts(spec, resolved_prompts)  # every tag's file found first
    files: dict[Path, LoraFile] = {}
    base_scheduler = pipe.scheduler
    order = sorted(
        ((r, c) for r in range(len(rows)) for c in range(len(values[x]))),
        key=lambda rc: _lora_key(cells_settings[rc[0]][rc[1]], prompts, spec),
    )
    cells: list[list[PILImage.Image | None]] = [[None] * len(values[x]) for _ in rows]
    with tqdm(total=len(order), desc="grid", unit="image", disable=None if progress else True) as bar:
        for r, c in order:
            settings = cells_settings[r][c]
            text, tagged = prompts[settings["prompt"]]
            wanted = [(Path(p), w, None) for p, w in spec.loras] + [(p, w, None) for p, w, _ in tagged]
            if settings["checkpoint"] is not None:
                wanted.append((settings["checkpoint"].path, settings["weight"], settings["checkpoint"].label))
            _use_loras(pipe, wanted, files)
            pipe.scheduler = base_scheduler  # each sampler is built on the model's own scheduler config
            (image,) = generate(
                pipe, text, spec.negative_prompt, steps=settings["steps"], guidance=settings["guidance"], seed=settings["seed"],
                height=spec.height, width=spec.width, model_name=model_name, progress=False, sampler=settings["sampler"],
            )  # fmt: skip
            cells[r][c] = image
            bar.update(1)
    pipe.scheduler = base_scheduler
    unload_loras(pipe)
    x_labels = [_label(x, v) for v in values[x]]
    y_labels = [_label(y, v) for v in rows] if y else []
    image, boxes = labelled_grid(cells, _TITLES[x], x_labels, _TITLES[y] if y else None, y_labels)
    return Grid(cells, x, y, x_labels, y_labels, image, boxes)


def resolve_prompts(spec: GridSpec, resolved: dict[str, tuple[str, list]] | None = None) -> dict[str, tuple[str, list]]:
    """{prompt: (text without tags, [(file, weight, tag)])} for each of the spec's prompts, as `prompt_loras` gives
    it; those in `resolved` are taken from it. A tag naming no file raises a one-line ValueError."""
    resolved = resolved or {}
    return {prompt: resolved[prompt] if prompt in resolved else prompt_loras(prompt, spec.lora_dir) for prompt in spec.prompts}


def _lora_key(settings: dict, prompts: dict, spec: GridSpec) -> tuple:
    """Cells that need the same LoRA files sort together, so each set is loaded once (weights change in place)."""
    checkpoint = settings["checkpoint"]
    return (str(checkpoint.path) if checkpoint else "", tuple(str(p) for p, _, _ in prompts[settings["prompt"]][1]))


def _use_loras(pipe, wanted: list[tuple[Path, float, str | None]], files: dict[Path, LoraFile]) -> None:
    """The pipeline holding exactly the `wanted` LoRA files at their weights, in that order."""
    loaded = loaded_loras(pipe)
    current = getattr(pipe, "_sdlora_grid_files", [])
    if current == [path for path, _, _ in wanted] and len(loaded) == len(wanted):
        set_lora_scales(pipe, {lora.name: weight for lora, (_, weight, _) in zip(loaded, wanted)})
        return
    unload_loras(pipe)
    for path, weight, label in wanted:
        if path not in files:
            files[path] = open_lora(path)
        name = re.sub(r"[^A-Za-z0-9_-]", "_", label) if label else None
        load_lora(
            pipe, files[path], scale=weight, adapter_name=name if name and name not in {lora.name for lora in loaded_loras(pipe)} else None
        )
    pipe._sdlora_grid_files = [path for path, _, _ in wanted]


# ---------------------------------------------------------------- drawing


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: its fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 4) -> list[str]:
    """The text broken at spaces (or anywhere, for a long word) into lines at most `width` pixels wide."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = max(1, next((i for i in range(len(word), 0, -1) if draw.textlength(word[:i], font=font) <= width), 1))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + "..."]
    return lines or [""]


def labelled_grid(
    cells: Sequence[Sequence[PILImage.Image]], x_title: str, x_labels: Sequence[str], y_title: str | None, y_labels: Sequence[str]
) -> tuple[PILImage.Image, list[list[tuple[int, int]]]]:
    """The cells (rows of images of one size) on white, with `Title: value` labels above each column and left of
    each row; returns the picture and each cell's top-left corner in it. Columns are at least wide enough for a
    label of a few words, so the labels of small images stay readable (the cells then stand apart)."""
    cell_w, cell_h = cells[0][0].width, cells[0][0].height
    font = _font(max(12, (cell_w + cell_h) // 25))  # A1111's X/Y plot sizes its labels by the cells too
    line_h = math.ceil(getattr(font, "size", 10) * 1.25)
    scratch = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    pitch_w = max(cell_w, 7 * line_h)
    pad = 4
    top_lines = [_wrap(scratch, f"{x_title}: {label}", font, pitch_w - 2 * pad) for label in x_labels]
    top = (max(len(lines) for lines in top_lines)) * line_h + 2 * pad
    side_lines = (
        [_wrap(scratch, f"{y_title}: {label}", font, 2 * pitch_w, max_lines=max(1, cell_h // line_h)) for label in y_labels]
        if y_title
        else []
    )
    left = int(math.ceil(max(scratch.textlength(line, font=font) for lines in side_lines for line in lines))) + 3 * pad if side_lines else 0
    grid = PILImage.new("RGB", (left + len(x_labels) * pitch_w, top + len(cells) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(top_lines):
        centre = left + c * pitch_w + pitch_w / 2
        for i, line in enumerate(lines):
            y_pos = top - pad - (len(lines) - i) * line_h
            draw.text((centre - scratch.textlength(line, font=font) / 2, y_pos), line, fill="black", font=font)
    for r, lines in enumerate(side_lines):
        y_pos = top + r * cell_h + (cell_h - len(lines) * line_h) / 2
        for i, line in enumerate(lines):
            draw.text((pad, y_pos + i * line_h), line, fill="black", font=font)
    boxes = [[(left + c * pitch_w + (pitch_w - cell_w) // 2, top + r * cell_h) for c in range(len(row))] for r, row in enumerate(cells)]
    for row, row_boxes in zip(cells, boxes):
        for image, box in zip(row, row_boxes):
            grid.paste(image, box)
    return grid, boxes
