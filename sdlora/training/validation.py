"""Validation during training: the held-out denoising loss at fixed noise and timesteps, and sample grids.

The loss is comparable between steps and against the base model (step 0) because everything random in it is
fixed: each held-out image gets one latent sample and, for each of `TIMESTEPS` timesteps spread evenly over the
schedule, one noise tensor, all drawn from a generator seeded by the run's seed. Averaging over the schedule
(rather than one random timestep per image) keeps the figure steady on small validation sets.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image as PILImage

from ..inference.generation import (
    PARAMETERS_KEY,
    NonFiniteImageError,
    generate,
    image_grid,
    model_label,
    png_info,
    seed_own_noise,
)
from ..storage.atomic import atomic_file
from .base_model import BaseModel
from .buckets import assign_bucket, training_sizes
from .cache import encode_captions, encode_images, scale_latents
from .config import DataConfig, ObjectiveConfig, RunConfig, SamplesConfig
from .data import ImageRecord, crop_window, load_image, sdxl_time_ids
from .metrics import MetricsLogger
from .objective import Conditioning, diffusion_loss
from .sample_prompts import SamplePrompt

TIMESTEPS = 8  # per held-out image, one UNet batch
SAMPLES_DIR = "samples"


def fixed_timesteps(num_train_timesteps: int, count: int = TIMESTEPS) -> torch.Tensor:
    """`count` timesteps at the middles of equal slices of [0, num_train_timesteps)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()


# --sample-vae-tiling auto tiles from this many pixels: SDXL's own 1024x1024 included, whose whole decode (about 3 GiB
# in fp32) would otherwise be a run's peak on an 8-12 GB card
TILING_FROM_PIXELS = 1024 * 1024
TILE_PIXELS = 512  # the tiles' side: diffusers' tiles are the VAE's sample_size (1024 for SDXL's: no tiles at 1024 px)


@contextlib.contextmanager
def decoding_in_tiles(vae, mode: str, width: int, height: int) -> Iterator[bool]:
    """The VAE decodes in tiles of at most TILE_PIXELS (overlapping and blended, diffusers' tiled_decode) and one
    image at a time (enable_tiling/enable_slicing) for the duration when --sample-vae-tiling is on, or auto and the
    image has TILING_FROM_PIXELS or more; yields whether it does."""
    tiled = mode == "on" or (mode == "auto" and width * height >= TILING_FROM_PIXELS)
    if not tiled:
        yield False
        return
    sizes = vae.tile_sample_min_size, vae.tile_latent_min_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = min(vae.tile_sample_min_size, TILE_PIXELS)
    vae.tile_latent_min_size = vae.tile_sample_min_size // factor
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        yield True
    finally:
        vae.disable_tiling()
        vae.disable_slicing()
        vae.tile_sample_min_size, vae.tile_latent_min_size = sizes


@dataclass
class HeldOut:
    """One held-out image's fixed inputs: a latent sample, one noise per timestep, its caption and its conditioning."""

    latents: torch.Tensor  # (1, C, H, W), scaled
    noise: torch.Tensor  # (TIMESTEPS, C, H, W)
    caption: str
    time_ids: torch.Tensor | None  # (1, 6) for SDXL
    embeddings: Conditioning | None  # None while a text encoder trains: it is encoded afresh each time


@dataclass
class Validator:
    """The held-out loss and the sample grids of one run; the held-out inputs are encoded once, at first use."""

    samples: SamplesConfig  # the sample images' steps and seed
    data: DataConfig  # the training resolution and bucketing, which the held-out images and samples share
    run: RunConfig  # the output folder (OUT/samples) and the seed of the held-out noise
    model: BaseModel  # its offloaded parts are brought to the accelerator for the duration of a validation
    accelerator: object
    objective: ObjectiveConfig
    records: list[ImageRecord]  # the held-out images
    sample_prompts: list[str]  # one grid batch at the run's sample settings
    prompt_file: list[SamplePrompt] = field(default_factory=list)  # --sample-prompts: an image each, at its own settings
    held_out: list[HeldOut] | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def _visiting(self) -> Iterator[None]:
        """The offloaded VAE and text encoders on the accelerator for the duration (a no-op on the CPU)."""
        device, offloaded = self.accelerator.device, self.model.offloaded
        if not offloaded or torch.device(device).type == "cpu":
            yield
            return
        for module in offloaded:
            module.to(device)
        try:
            yield
        finally:
            for module in offloaded:
                module.to("cpu")

    @torch.no_grad()
    def held_out_inputs(self) -> list[HeldOut]:
        """The fixed inputs of every held-out image, encoded once per run (VAE and, unless trained, text encoders)."""
        if self.held_out is None:
            generator = torch.Generator().manual_seed(self.run.seed + 7)
            with self._visiting():
                self.held_out = [self._held_out(record, generator) for record in self.records]
        return self.held_out

    def _held_out(self, record: ImageRecord, generator: torch.Generator) -> HeldOut:
        device, pipe = self.accelerator.device, self.model.pipe
        size = assign_bucket(record.width, record.height, training_sizes(self.data.resolution, self.data.buckets))
        window = crop_window(record, size, "center")
        pixels = load_image(record, size, flip=False, window=window).unsqueeze(0)
        mean, std = encode_images(pipe.vae, pixels, [record.path], device)
        latents = scale_latents(mean + std * torch.randn(mean.shape, generator=generator).to(device), pipe.vae)
        noise = torch.randn((TIMESTEPS, *latents.shape[1:]), generator=generator).to(device)
        time_ids = torch.tensor([sdxl_time_ids(record, size, window, False)], dtype=torch.float32) if self.model.family.time_ids else None
        held = HeldOut(latents, noise, record.caption, time_ids, None)
        if not self.model.trains_text_encoders:
            held.embeddings = self._conditioning(held)
        return held

    def _conditioning(self, held: HeldOut) -> Conditioning:
        model = self.model
        hidden, pooled = encode_captions(
            model.pipe, model.text_encoders, model.family, [held.caption], self.accelerator.device, model.t5_max_length
        )
        return Conditioning(hidden, pooled, held.time_ids)

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss over the held-out images and the fixed timesteps."""
        device = self.accelerator.device
        timesteps = fixed_timesteps(self.model.noise_scheduler.config.num_train_timesteps).to(device)
        losses = []
        for held in self.held_out_inputs():
            latents = held.latents.expand(len(timesteps), *held.latents.shape[1:])
            conditioning = (held.embeddings if held.embeddings is not None else self._conditioning(held)).repeat(len(timesteps))
            with self.accelerator.autocast():
                loss = diffusion_loss(
                    self.model.unet, self.model.noise_scheduler, latents.to(self.model.dtype), conditioning.to(device, self.model.dtype),
                    self.objective, timesteps=timesteps, noise=held.noise, flow_matching=self.model.flow_matching,
                )  # fmt: skip
            losses.append(loss.item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def save_samples(self, step: int) -> tuple[Path, PILImage.Image]:
        """The sample images at fixed seeds: the sample prompts' and then each --sample-prompts line's (also saved
        alone as samples/step-XXXXXXXX-NN.png with its A1111 parameters), in a grid saved as samples/step-XXXXXXXX.png."""
        samples, resolution, pipe = self.samples, self.data.resolution, self.model.pipe
        denoiser = getattr(pipe, self.model.family.denoiser)
        was_training = denoiser.training
        denoiser.eval()
        folder = Path(self.run.output_dir) / SAMPLES_DIR
        images = []
        with self._visiting(), self.accelerator.autocast():
            if self.sample_prompts:
                tiling = decoding_in_tiles(pipe.vae, samples.sample_vae_tiling, resolution, resolution)
                seed_own_noise(pipe.scheduler, samples.sample_seed)  # DPM++ SDE's own noise: seeded, as generate seeds it
                with tiling:
                    images = pipe(
                        self.sample_prompts,
                        num_inference_steps=samples.sample_steps,
                        generator=torch.Generator().manual_seed(samples.sample_seed),
                        height=resolution,
                        width=resolution,
                    ).images
            scheduler = pipe.scheduler  # the run's sampler; a line's --ss holds for that line only
            for index, sample in enumerate(self.prompt_file):
                height, width = sample.height or resolution, sample.width or resolution
                try:
                    with decoding_in_tiles(pipe.vae, samples.sample_vae_tiling, width, height):
                        (image,) = generate(
                            pipe, sample.prompt, sample.negative_prompt, steps=sample.steps or samples.sample_steps,
                            guidance=7.5 if sample.guidance is None else sample.guidance,
                            seed=samples.sample_seed if sample.seed is None else sample.seed, height=height, width=width,
                            model_name=model_label(self.model.name), progress=False, sampler=sample.sampler,
                        )  # fmt: skip
                except NonFiniteImageError as err:  # a sample is no reason to stop a run: say so, leave a black cell
                    warnings.warn(f"sample prompt {index + 1} at step {step}: {err}", stacklevel=1)
                    images.append(PILImage.new("RGB", (width, height)))
                    continue
                finally:
                    pipe.scheduler = scheduler
                with atomic_file(folder / f"step-{step:08d}-{index:02d}.png") as tmp:
                    image.save(tmp, format="PNG", pnginfo=png_info(image.info[PARAMETERS_KEY]))
                images.append(image)
        denoiser.train(was_training)
        grid = image_grid(images)
        path = folder / f"step-{step:08d}.png"
        with atomic_file(path) as tmp:
            grid.save(tmp, format="PNG")
        return path, grid

    def evaluate(self, metrics: MetricsLogger, step: int) -> None:
        """Held-out loss (with --val-split) and the sample grid (to the trackers too); the main process writes them."""
        values = {"val_loss": self.loss()} if self.records else {}
        if self.accelerator.is_main_process:
            if self.samples.samples:
                _, grid = self.save_samples(step)
                metrics.log_images(step, {"samples": grid})
            if values:
                metrics.log(step, **values)
        self.accelerator.wait_for_everyone()
