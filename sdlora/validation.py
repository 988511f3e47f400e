"""Validation during training: the held-out denoising loss at fixed noise and timesteps, and sample grids.

The loss is comparable between steps and against the base model (step 0) because everything random in it is
fixed: each held-out image gets one latent sample and, for each of `TIMESTEPS` timesteps spread evenly over the
schedule, one noise tensor, all drawn from a generator seeded by the run's seed. Averaging over the schedule
(rather than one random timestep per image) keeps the figure steady on small validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import data, objective, report
from .cache import encode_captions, encode_distribution

if TYPE_CHECKING:
    from .metrics import MetricsLogger
    from .trainer import Run

TIMESTEPS = 8  # per held-out image, one UNet batch


def fixed_timesteps(num_train_timesteps: int, count: int = TIMESTEPS) -> torch.Tensor:
    """`count` timesteps at the middles of equal slices of [0, num_train_timesteps)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()


@dataclass
class HeldOut:
    """One held-out image's fixed inputs: a latent sample, one noise per timestep, and its caption embedding."""

    latents: torch.Tensor  # (1, C, H, W), scaled
    noise: torch.Tensor  # (TIMESTEPS, C, H, W)
    caption: str
    embeddings: torch.Tensor | None  # None while the text encoder trains: it is encoded afresh each time


@torch.no_grad()
def held_out_inputs(run: Run) -> list[HeldOut]:
    """The fixed inputs of every held-out image, encoded once per run (VAE and, unless trained, text encoder)."""
    if run.held_out is None:
        config, device = run.config, run.accelerator.device
        generator = torch.Generator().manual_seed(config.seed + 7)
        choices = data.training_sizes(config.resolution, config.buckets)
        run.held_out = []
        for record in run.val_records:
            size = data.assign_bucket(record.width, record.height, choices)
            mean, std = encode_distribution(run.pipe.vae, data.load_image(record, size, crop="center", flip=False).unsqueeze(0), device)
            latents = (mean + std * torch.randn(mean.shape, generator=generator).to(device)) * run.pipe.vae.config.scaling_factor
            noise = torch.randn((TIMESTEPS, *latents.shape[1:]), generator=generator).to(device)
            embeddings = None if config.train_text_encoder else encode_captions(run.pipe.tokenizer, run.text_encoder, [record.caption], device)
            run.held_out.append(HeldOut(latents, noise, record.caption, embeddings))
    return run.held_out


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """Mean loss over the held-out images and the fixed timesteps."""
    device = run.accelerator.device
    timesteps = fixed_timesteps(run.noise_scheduler.config.num_train_timesteps).to(device)
    losses = []
    for held in held_out_inputs(run):
        latents = held.latents.expand(len(timesteps), *held.latents.shape[1:])
        embeddings = held.embeddings if held.embeddings is not None else encode_captions(run.pipe.tokenizer, run.text_encoder, [held.caption], device)
        embeddings = embeddings.expand(len(timesteps), -1, -1)
        with run.accelerator.autocast():
            loss = objective.diffusion_loss(run.unet, run.noise_scheduler, latents.to(run.weight_dtype), embeddings.to(run.weight_dtype), run.objective, timesteps=timesteps, noise=held.noise)
        losses.append(loss.item())
    return sum(losses) / len(losses)


def validate(run: Run, metrics: MetricsLogger, step: int) -> None:
    """Validation loss (with --val-split) and a sample grid; the main process writes them."""
    values = {"val_loss": validation_loss(run)} if run.val_records else {}
    if run.accelerator.is_main_process:
        report.save_samples(run, step)
        if values:
            metrics.log(step, **values)
    run.accelerator.wait_for_everyone()
