"""Generate images with a pipeline and save them as PNGs with A1111's `parameters` text chunk, plus a grid."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from ..core.version import __version__
from ..storage.atomic import atomic_file, check_writable_target
from .adapters import LoadedLora, loaded_loras

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111, ComfyUI and civitai read generation settings from
GRID_NAME = "grid.png"
_IMAGE_NAME = re.compile(r"(\d{5})-.*\.png")

# diffusers scheduler class -> the sampler name A1111 writes
_SAMPLER_NAMES = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}


def sampler_name(scheduler) -> str:
    """A1111's name for a diffusers scheduler (its class name without `Scheduler` when A1111 has none)."""
    class_name = type(scheduler).__name__
    return _SAMPLER_NAMES.get(class_name, class_name.removesuffix("Scheduler"))


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
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_width = max(image.width for image in images)
    cell_height = max(image.height for image in images)
    grid = PILImage.new("RGB", (columns * cell_width, rows * cell_height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * cell_width, (index // columns) * cell_height))
    return grid


def _png_info(parameters: str | None):
    info = PngInfo()
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
            image.save(tmp, format="PNG", pnginfo=_png_info(image.info.get(PARAMETERS_KEY)))
        paths.append(path)
    if grid and images:
        with atomic_file(out_dir / GRID_NAME) as tmp:
            image_grid(images).save(tmp, format="PNG", pnginfo=_png_info(images[0].info.get(PARAMETERS_KEY)))
        paths.append(out_dir / GRID_NAME)
    return paths


def read_parameters(path: str | os.PathLike) -> str | None:
    """The `parameters` text chunk of a PNG, or None."""
    with PILImage.open(path) as image:
        return image.text.get(PARAMETERS_KEY)


# ---------------------------------------------------------------- generation


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'mps', else 'cpu'; other names pass through."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """fp16 on accelerators; fp32 on CPU, where fp16 matmuls are many times slower."""
    return torch.float32 if device.startswith("cpu") else torch.float16


def check_image_size(value: int | None, name: str) -> None:
    """Raise a one-line error unless `value` is None or a positive multiple of 8 (what the VAE needs)."""
    if value is not None and (value <= 0 or value % 8):
        raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


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
) -> list[PILImage.Image]:
    """Generate `num_images` PIL images; image i uses seed `seed + i` (random seed when None), so one can be redone alone.

    Each image's `info["parameters"]` holds A1111's text (prompt, LoRAs, seed, steps, ...), which `save_images` writes.
    """
    for value, name in ((steps, "steps"), (num_images, "num_images")):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    check_image_size(height, "height")
    check_image_size(width, "width")
    if seed is None:
        seed = random.randrange(2**32)
    if not 0 <= seed <= 2**63 - num_images:
        raise ValueError(f"seed must be between 0 and 2**63, got {seed}")
    # CPU generators: the same seed gives the same starting noise on every device
    generators = [torch.Generator("cpu").manual_seed(seed + index) for index in range(num_images)]
    pipe.set_progress_bar_config(disable=not progress, desc="generating")
    images = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        height=height,
        width=width,
        generator=generators,
    ).images
    loras = loaded_loras(pipe)
    for index, image in enumerate(images):
        image.info["parameters"] = a1111_parameters(
            prompt, negative_prompt, steps=steps, sampler=sampler_name(pipe.scheduler), guidance=guidance,
            seed=seed + index, width=image.width, height=image.height, model=model_name, loras=loras,
        )  # fmt: skip
        image.info["seed"] = seed + index
    return images
