"""What a training run leaves for people: LoRA files with training metadata, config.toml, model card, sample grids."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import atomic_file, check_writable_target
from .config import to_toml
from .images import image_grid
from .lorafile import write_diffusers, write_kohya
from .state import LoraState

if TYPE_CHECKING:
    from .trainer import Run

SAMPLES_DIR = "samples"
STARTED_AT = str(int(time.time()))


def check_output_dir(out: Path) -> None:
    """The output folder must be creatable and writable; an existing file there is an error."""
    check_writable_target(out, is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to output folder {out}: permission denied")


def training_metadata(run: Run) -> dict[str, str]:
    """kohya's `ss_*` training keys, which A1111/ComfyUI/civitai show for a LoRA."""
    config = run.config
    return {
        "ss_output_name": config.name,
        "ss_sd_model_name": Path(config.model).name or config.model,
        "ss_training_started_at": STARTED_AT,
        "ss_learning_rate": f"{config.lr:g}",
        "ss_unet_lr": f"{config.lr:g}",
        "ss_text_encoder_lr": f"{(config.text_encoder_lr or config.lr / 2) if config.train_text_encoder else 0:g}",
        "ss_max_train_steps": str(config.steps),
        "ss_num_train_images": str(len(run.records)),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accum),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.buckets),
        "ss_flip_aug": str(config.flip),
        "ss_seed": str(config.seed),
        "ss_mixed_precision": config.mixed_precision,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_network_dropout": f"{config.dropout:g}",
        "ss_noise_offset": f"{config.noise_offset:g}",
        "ss_min_snr_gamma": f"{config.snr_gamma:g}" if config.snr_gamma else "None",
        "ss_caption_dropout_rate": f"{config.caption_dropout:g}",
        "ss_optimizer": "torch.optim.AdamW",
        "ss_tag_frequency": "{}" if not config.trigger else f'{{"{config.trigger}": {len(run.records)}}}',
        "sdlora_preset": config.preset,
        "sdlora_trigger": config.trigger or "",
    }


def write_lora_files(state: LoraState, diffusers_path: Path | None, kohya_path: Path | None, run: Run) -> None:
    """The diffusers file (save_lora_weights, alpha in metadata) and/or the kohya file with training metadata."""
    if diffusers_path is not None:
        write_diffusers(state, diffusers_path)
    if kohya_path is not None:
        write_kohya(state, kohya_path, training_metadata(run))


def write_config_and_card(run: Run, out: Path) -> None:
    """config.toml (the effective config) and README.md (model card)."""
    with atomic_file(out / "config.toml") as tmp:
        tmp.write_text(to_toml(run.config), encoding="utf-8")
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(model_card(run, out), encoding="utf-8")


def model_card(run: Run, out: Path) -> str:
    config = run.config
    grids = sorted((out / SAMPLES_DIR).glob("step-*.png"))
    sample = f"![samples]({SAMPLES_DIR}/{grids[-1].name})\n" if grids else ""
    trigger = f"Trigger word: **{config.trigger}** (put it in your prompt).\n" if config.trigger else "No trigger word.\n"
    return f"""---
{_base_model_line(config.model)}library_name: diffusers
tags: [stable-diffusion, lora, sdlora]
---
# {config.name}

A LoRA for Stable Diffusion trained with sdlora on {len(run.records)} images from `{config.data_dir}`.
{trigger}
{sample}
| setting | value |
| --- | --- |
| base model | `{config.model}` |
| rank / alpha | {config.rank} / {config.alpha:g} |
| layers | `{config.preset}`{' + text encoder' if config.train_text_encoder else ''} |
| steps x batch | {config.steps} x {config.batch_size} (accumulation {config.grad_accum}) |
| learning rate | {config.lr:g} ({config.lr_scheduler}, warm-up {config.lr_warmup_steps}) |
| resolution | {config.resolution}{' with aspect buckets' if config.buckets else ''} |
| mixed precision | {config.mixed_precision} |
| seed | {config.seed} |

## Files
- `pytorch_lora_weights.safetensors`: diffusers (`pipe.load_lora_weights(folder)`).
- `{config.name}.safetensors`: A1111 / Forge (`models/Lora`), ComfyUI (`models/loras`), kohya's sd-scripts.
- `config.toml`: the exact settings; `sdlora train --config config.toml` repeats the run.
- `metrics.jsonl`: loss, learning rate and validation loss per step.

## Use with diffusers
```python
{_pipeline_code(config.model)}
pipe.load_lora_weights("{out}")
image = pipe("{(config.validation_prompts or [config.trigger or 'a picture'])[0]}").images[0]
```
"""


def _base_model_line(model: str) -> str:
    """`base_model:` for the hub's model card metadata: only a hub id belongs there, not a local path or `tiny`."""
    from .models import is_hub_id

    return f"base_model: {model}\n" if is_hub_id(model) else ""


def _pipeline_code(model: str) -> str:
    """The lines that load the base model in plain diffusers (or sdlora, for its embedded test models)."""
    from .models import SINGLE_FILE_SUFFIXES, is_builtin_model

    if is_builtin_model(model):
        return f'from sdlora import load_pipeline\npipe = load_pipeline("{model}")  # sdlora\'s embedded random-weight test model'
    if Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return f'from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_single_file("{model}")'
    return f'from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained("{model}")'


def sample_prompts(run: Run) -> list[str]:
    """The validation prompts, else the trigger word, else the first caption."""
    config = run.config
    return list(config.validation_prompts) or [config.trigger or run.records[0].caption]


@torch.no_grad()
def save_samples(run: Run, step: int) -> Path:
    """A grid of images for the sample prompts at a fixed seed, saved as samples/step-XXXXXXXX.png."""
    config, pipe = run.config, run.pipe
    was_training = pipe.unet.training
    pipe.unet.eval()
    generator = torch.Generator().manual_seed(config.sample_seed)
    with run.accelerator.autocast():
        images = pipe(sample_prompts(run), num_inference_steps=config.sample_steps, generator=generator, height=config.resolution, width=config.resolution).images
    pipe.unet.train(was_training)
    path = Path(config.output_dir) / SAMPLES_DIR / f"step-{step:08d}.png"
    with atomic_file(path) as tmp:
        image_grid(images).save(tmp, format="PNG")
    return path
