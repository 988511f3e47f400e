"""The diffusion training objective: timesteps, noise, the target the UNet learns, min-SNR weights, the loss.

All randomness comes from the `torch.Generator` passed in, so a run (and a resumed run that reseeds it) draws the
same timesteps and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Conditioning:
    """What the UNet is conditioned on: the text it attends to, and for SDXL the pooled text embedding and the time
    ids (original size, crop top-left, target size per image)."""

    hidden: torch.Tensor  # (batch, tokens, width)
    pooled: torch.Tensor | None = None  # (batch, width of the pooled encoder's projection)
    time_ids: torch.Tensor | None = None  # (batch, 6)

    def to(self, device, dtype: torch.dtype) -> Conditioning:
        def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, dtype)

        return Conditioning(cast(self.hidden), cast(self.pooled), cast(self.time_ids))

    def repeat(self, count: int) -> Conditioning:
        """One image's conditioning for `count` rows (the validation loss's timesteps)."""

        def expand(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.expand(count, *tensor.shape[1:])

        return Conditioning(expand(self.hidden), expand(self.pooled), expand(self.time_ids))

    def unet_kwargs(self) -> dict:
        """The keyword arguments a diffusers UNet2DConditionModel takes them as."""
        kwargs = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


@dataclass
class ObjectiveConfig:
    """Options of the noise-prediction loss."""

    prediction_type: str | None = field(default=None, metadata={"help": "epsilon, v_prediction or sample; None: the scheduler's"})
    snr_gamma: float | None = field(default=None, metadata={"help": "min-SNR-gamma weighting (5.0 is usual); None: unweighted"})
    noise_offset: float = field(default=0.0, metadata={"help": "scale of a per-channel constant added to the noise"})

    def __post_init__(self) -> None:
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            raise ValueError(f"snr_gamma must be a positive number, got {self.snr_gamma}")
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise ValueError(f"noise_offset must be zero or more, got {self.noise_offset}")


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """`batch` timesteps drawn uniformly from [0, num_train_timesteps), as int64 on `device`."""
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=_generator_device(generator))
    return timesteps.to(device)


def make_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like `latents` (fp32, on their device), plus noise_offset * N(0, 1) per sample and channel."""
    device = _generator_device(generator)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        # a constant shift per channel lets the model learn to change an image's overall brightness
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device, dtype=torch.float32)
        noise = noise + noise_offset * offset
    return noise.to(latents.device)


def _prediction_type(scheduler, prediction_type: str | None) -> str:
    return prediction_type or scheduler.config.prediction_type


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str | None) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon), the velocity alpha_t*noise - sigma_t*x0, or x0 (sample)."""
    prediction_type = _prediction_type(scheduler, prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each timestep, fp32 on the timesteps' device."""
    # float64 on the CPU (MPS has no float64): 1 - alpha_bar loses digits in fp32 at small t
    alphas_cumprod = scheduler.alphas_cumprod.to("cpu", torch.float64)[timesteps.cpu()]
    return (alphas_cumprod / (1.0 - alphas_cumprod)).to(timesteps.device, torch.float32)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for each timestep, for the given prediction type.

    The paper weights the x0 loss by min(SNR, gamma); expressed on the epsilon loss that is min(SNR, gamma) / SNR,
    on the velocity loss min(SNR, gamma) / (SNR + 1).
    """
    prediction_type = _prediction_type(scheduler, prediction_type)
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction_type == "epsilon":
        # SNR 0 (a zero-terminal-SNR schedule's last step): the limit of min(SNR, gamma) / SNR is 1
        return torch.where(ratio > 0, clipped / ratio, torch.ones_like(ratio))
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    conditioning: Conditioning | torch.Tensor,
    config: ObjectiveConfig,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally min-SNR-weighted) MSE between the UNet's prediction and its target, as a scalar.

    Noise and timesteps are drawn from `generator` unless given (given noise is used as is, without noise offset):
    fixed ones make the loss deterministic, as the validation loss needs. The UNet runs in the dtype of `latents`
    (the caller's mixed-precision dtype); noising, target and MSE are computed in fp32.
    """
    prediction_type = _prediction_type(scheduler, config.prediction_type)
    clean = latents.to(torch.float32)
    if noise is None:
        noise = make_noise(clean, generator, config.noise_offset)
    noise = noise.to(clean.device, torch.float32)
    if timesteps is None:
        timesteps = sample_timesteps(clean.shape[0], scheduler.config.num_train_timesteps, generator, clean.device)
    timesteps = timesteps.to(clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if isinstance(conditioning, torch.Tensor):  # the text alone (SD1/SD2)
        conditioning = Conditioning(conditioning)
    prediction = unet(
        noisy.to(latents.dtype), timesteps, **conditioning.to(latents.device, latents.dtype).unet_kwargs(), return_dict=False
    )[0]
    target = target_for(scheduler, clean, noise, timesteps, prediction_type)
    per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=tuple(range(1, target.ndim)))
    if config.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, config.snr_gamma, prediction_type)
    return per_sample.mean()
