"""Generate images with a pipeline and save them as PNGs with A1111's `parameters` text chunk, plus a grid."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from ..core.version import __version__
from ..errors import UserError
from ..storage import output_rules
from ..storage.atomic import atomic_file, check_writable_target
from .adapters import LoadedLora, loaded_loras
from .samplers import sampler_name, set_sampler

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111, ComfyUI and civitai read generation settings from
GRID_NAME = "grid.png"
MAX_IMAGE_SIDE = 8192  # pixels: an 8192 x 8192 SD image already needs tens of GB in the VAE
MAX_GUIDANCE = 100.0  # A1111's CFG slider stops at 30; far above it the latents overflow to NaN


class NonFiniteImageError(UserError):
    """An image came out NaN or inf (a LoRA weight or guidance too high, or half precision overflowing)."""


SOFTWARE_KEY, SOFTWARE = "Software", "sdlora"  # the PNG text chunk that marks an image as sdlora's


def check_image_output(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """An image folder (images are added to it): not the model's folder nor inside it, and any `grid.png` there (the
    one file a run replaces) sdlora's own. Called before the model loads."""
    out_dir = output_rules.check_image_folder(out_dir, inputs)
    grid = out_dir / GRID_NAME
    if grid.exists() and not _is_sdlora_png(grid):
        raise FileExistsError(
            f"--out {out_dir} holds a {GRID_NAME} sdlora did not write, which this run would replace: choose another folder"
        )
    return out_dir


def _is_sdlora_png(path: Path) -> bool:
    try:
        with PILImage.open(path) as image:
            text = getattr(image, "text", {})
    except (OSError, ValueError):
        return False
    return text.get(SOFTWARE_KEY) == SOFTWARE or "Version: sdlora" in text.get(PARAMETERS_KEY, "")


_IMAGE_NAME = re.compile(r"(\d{5})-.*\.png")


def _quote(value: str) -> str:
    """A1111's rule: a value holding a comma, colon or newline is written as a JSON string."""
    return json.dumps(value, ensure_ascii=False) if any(ch in value for ch in ",:\n") else value


def model_label(model: str) -> str:
    """The name a PNG records for `--model`: a file's stem, a folder's or hub id's last part."""
    path = Path(model.rstrip("/\\"))
    return path.stem if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else path.name or model


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    *,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str | None = None,
    loras: Sequence[LoadedLora] = (),
) -> str:
    """The `parameters` text as A1111 writes it: prompt with `<lora:name:weight>` tags, negative prompt, settings line."""
    prompt_line = prompt + "".join(f" <lora:{lora.name}:{lora.scale:g}>" for lora in loras)
    lines = [prompt_line]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    settings = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {guidance:g}", f"Seed: {seed}", f"Size: {width}x{height}"]
    if model:
        settings.append(f"Model: {_quote(model)}")
    hashes = [f"{lora.name}: {lora.file_hash}" for lora in loras if lora.file_hash]
    if hashes:
        settings.append(f'Lora hashes: "{", ".join(hashes)}"')
    settings.append(f"Version: sdlora {__version__}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def image_grid(images: Sequence[PILImage.Image], columns: int | None = None) -> PILImage.Image:
    """The images pasted into a near-square grid (row by row), on black."""
    if not images:
        raise UserError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_width = max(image.width for image in images)
    cell_height = max(image.height for image in images)
    grid = PILImage.new("RGB", (columns * cell_width, rows * cell_height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * cell_width, (index // columns) * cell_height))
    return grid


def png_info(parameters: str | None) -> PngInfo:
    """The PNG text chunks of an image: `Software: sdlora` (a later run may replace it) and its A1111 `parameters`,
    when it has them."""
    info = PngInfo()
    info.add_text(SOFTWARE_KEY, SOFTWARE)
    if parameters:
        info.add_text(PARAMETERS_KEY, parameters)  # tEXt, or iTXt when the prompt is not Latin-1
    return info


def _next_index(out_dir: Path) -> int:
    """One past the highest `NNNNN-` number in `out_dir`, so a second run adds images instead of replacing them."""
    if not out_dir.is_dir():
        return 0
    numbers = [int(match.group(1)) for entry in out_dir.iterdir() if (match := _IMAGE_NAME.fullmatch(entry.name))]
    return max(numbers, default=-1) + 1


def save_images(images: Sequence[PILImage.Image], out_dir: str | os.PathLike, grid: bool = True) -> list[Path]:
    """Write each image as `NNNNN-<seed>.png` with its `parameters` text chunk, and `grid.png`; returns the paths."""
    out_dir = check_writable_target(out_dir, is_dir=True)
    index = _next_index(out_dir)
    paths = []
    for offset, image in enumerate(images):
        seed = image.info.get("seed", "noseed")
        path = out_dir / f"{index + offset:05d}-{seed}.png"
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=png_info(image.info.get(PARAMETERS_KEY)))
        paths.append(path)
    if grid and images:
        with atomic_file(out_dir / GRID_NAME) as tmp:
            image_grid(images).save(tmp, format="PNG", pnginfo=png_info(images[0].info.get(PARAMETERS_KEY)))
        paths.append(out_dir / GRID_NAME)
    return paths


def read_parameters(path: str | os.PathLike) -> str | None:
    """The `parameters` text chunk of a PNG, or None."""
    with PILImage.open(path) as image:
        return image.text.get(PARAMETERS_KEY)


_SETTING = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's `parameters` text as a dict: `Prompt`, `Negative prompt` and each setting of the last line
    (`Steps`, `Sampler`, `Seed`, `Size`, ...; quoted values unquoted), as A1111's infotext reader splits it."""
    *prompt_lines, settings = text.strip().split("\n")
    fields: dict[str, str] = {}
    negative = [i for i, line in enumerate(prompt_lines) if line.startswith("Negative prompt:")]
    cut = negative[0] if negative else len(prompt_lines)
    fields["Prompt"] = "\n".join(prompt_lines[:cut])
    if negative:
        fields["Negative prompt"] = "\n".join(prompt_lines[cut:]).removeprefix("Negative prompt:").strip()
    for key, value in _SETTING.findall(settings):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


# ---------------------------------------------------------------- generation


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'mps', else 'cpu'; another name passes through if this machine has it."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    # torch fails on these only when the first tensor moves, with an AssertionError or a word about its build
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there is no such GPU here ({torch.cuda.device_count()} found, numbered from 0)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: this machine has no MPS (Apple GPU) device; use --device cpu (or auto)")
    return name


def default_dtype(device: str) -> torch.dtype:
    """fp16 on accelerators; fp32 on CPU, where fp16 matmuls are many times slower."""
    return torch.float32 if device.startswith("cpu") else torch.float16


def check_image_size(value: int | None, name: str) -> None:
    """Raise a one-line error unless `value` is None or a positive multiple of 8 (what the VAE needs) of at most
    MAX_IMAGE_SIDE."""
    if value is not None and (value <= 0 or value % 8):
        raise UserError(f"{name} must be a positive multiple of 8, got {value}")
    if value is not None and value > MAX_IMAGE_SIDE:
        raise UserError(f"{name} {value} is larger than {MAX_IMAGE_SIDE}: images that size would not fit in memory")


def check_guidance(value: float, name: str) -> None:
    """Raise a one-line error unless `value` is a finite guidance scale from 0 to MAX_GUIDANCE."""
    if not 0 <= value <= MAX_GUIDANCE:  # NaN fails this too
        raise UserError(f"{name} {value!r:.20}: the guidance scale must be a number from 0 to {MAX_GUIDANCE:g} (7.5 is usual)")


def seed_own_noise(scheduler, seed: int) -> bool:
    """Seed a scheduler's noise source of its own (DPM++ SDE's Brownian tree, `DPMSolverSDEScheduler`) with `seed`,
    so the next call to the pipeline draws it from that seed; returns whether it has one (others are left as they are)."""
    if not hasattr(scheduler, "noise_sampler_seed"):
        return False
    scheduler.noise_sampler_seed = seed
    scheduler.noise_sampler = None  # made again from the seed at the next step
    return True


def generate(
    pipe,
    prompt: str,
    negative_prompt: str | None = None,
    steps: int = 20,
    guidance: float = 7.5,
    seed: int | None = None,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    sampler: str | None = None,
) -> list[PILImage.Image]:
    """Generate `num_images` PIL images; image i uses seed `seed + i` (random seed when None), so one can be redone alone.

    `sampler`: an A1111 sampler name ("DPM++ 2M Karras"), kohya's or a diffusers scheduler class name, set on the
    pipeline for this and later calls (`inference.samplers`); None keeps the pipeline's scheduler.
    Each image's `info["parameters"]` holds A1111's text (prompt, LoRAs, seed, steps, sampler...), which `save_images` writes.
    """
    for value, name in ((steps, "steps"), (num_images, "num_images")):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    check_image_size(height, "height")
    check_image_size(width, "width")
    check_guidance(guidance, "guidance")
    if sampler is not None:
        set_sampler(pipe, sampler)
    if seed is None:
        seed = random.randrange(2**32)
    if not 0 <= seed <= 2**63 - num_images:
        raise UserError(f"seed must be between 0 and 2**63, got {seed}")
    # CPU generators: the same seed gives the same starting noise on every device
    pipe.set_progress_bar_config(disable=not progress, desc="generating")
    # a scheduler with a noise source of its own (DPM++ SDE's Brownian tree) draws it from one seed for the whole
    # batch: such images are made one at a time, each with its own seed, so image i is still seed + i alone
    own_noise = hasattr(pipe.scheduler, "noise_sampler_seed")
    batches = [(seed + index, 1) for index in range(num_images)] if own_noise else [(seed, num_images)]
    images = []
    for first, count in batches:
        if own_noise:
            seed_own_noise(pipe.scheduler, first)
        pixels = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=count,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(first + index) for index in range(count)],
            output_type="np",  # floats: a NaN image is still NaN here, where a PNG would be black
        ).images
        bad = [first + index for index in range(count) if not np.isfinite(pixels[index]).all()]
        if bad:
            raise NonFiniteImageError(
                f"the image of seed {bad[0]} came out NaN or inf, so it was not saved: lower the LoRA weights or the "
                "guidance, or run the model in fp32 (half precision can overflow)"
            )
        images += pipe.image_processor.numpy_to_pil(pixels)
    loras = loaded_loras(pipe)
    for index, image in enumerate(images):
        image.info["parameters"] = a1111_parameters(
            prompt, negative_prompt, steps=steps, sampler=sampler_name(pipe.scheduler), guidance=guidance,
            seed=seed + index, width=image.width, height=image.height, model=model_name, loras=loras,
        )  # fmt: skip
        image.info["seed"] = seed + index
    return images
