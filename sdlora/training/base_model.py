"""The frozen base model as a training run holds it (`BaseModel`), loaded from the run's base-model section."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.families import ModelFamily, family_of_pipeline
from ..errors import UserError
from ..models.loading import load_pipeline, load_vae
from .config import BaseModelConfig
from .fp8 import store_weights_in_fp8

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # by --mixed-precision; fp32 otherwise


@dataclass
class BaseModel:
    """The pipeline and its parts as training uses them: frozen weights in `dtype` on `device`; the UNet and the
    trained text encoders are replaced by accelerate's wrappers (DDP) once the optimizer is prepared."""

    name: str  # --model as given: labels of sample images, fingerprints of cached latents
    pipe: object
    family: ModelFamily
    dtype: torch.dtype  # of the frozen weights: what the UNet runs in
    device: torch.device
    unet: torch.nn.Module  # the denoiser: the UNet, or SD3's transformer (the family's `denoiser` names its component)
    text_encoders: dict[str, torch.nn.Module]  # by component (SD3's T5 absent with --no-t5)
    noise_scheduler: object  # how training noises: DDPM over the model's schedule, or SD3's flow-matching scheduler
    trained: tuple[str, ...] = ("unet",)  # the components that carry a trained LoRA (the denoiser's first)
    offloaded: list[torch.nn.Module] = field(default_factory=list)  # kept off the accelerator between uses
    t5_max_length: int = 77  # SD3: the T5's tokens per caption

    @property
    def flow_matching(self) -> bool:
        return self.family.objective == "flow_matching"

    @property
    def trains_text_encoders(self) -> bool:
        return len(self.trained) > 1


def load_base_model(base: BaseModelConfig, device: torch.device) -> BaseModel:
    """The model of `base.model` (with `base.vae` instead of its own VAE), frozen, its VAE and text encoders on
    `device` (the UNet on the CPU: the recipe moves it once the caches are filled): half precision under
    mixed precision (the LoRA parameters stay fp32 unless --full-bf16/--full-fp16); with --fp8-base the UNet's and
    text encoders' Linear/Conv2d weights are stored in fp8 and cast up to that precision layer by layer."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # diffusers takes seconds to import: only when training starts

    dtype = WEIGHT_DTYPES.get(base.mixed_precision, torch.float32)
    pipe = load_pipeline(base.model, dtype=dtype, config=base.model_config, allow_pickle=base.allow_pickle)
    if base.vae:
        pipe.vae = load_vae(base.vae, dtype, allow_pickle=base.allow_pickle)
    family = family_of_pipeline(pipe)
    if base.no_t5 or base.t5_max_length != 77:
        if not any(spec.architecture == "t5" for spec in family.text_encoders):
            raise UserError(f"--no-t5 and --t5-max-length are for SD3 models; {base.model} is {family.label}")
    if base.no_t5:
        pipe.text_encoder_3 = pipe.tokenizer_3 = None
    denoiser = getattr(pipe, family.denoiser)
    if family.vae_fp32_when_half and dtype != torch.float32 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in half precision unless fixed (its config says so)
    pipe.set_progress_bar_config(disable=True)
    encoders = {spec.component: getattr(pipe, spec.component, None) for spec in family.text_encoders}
    text_encoders = {component: encoder for component, encoder in encoders.items() if encoder is not None}
    for part in (pipe.vae, denoiser, *text_encoders.values()):
        part.requires_grad_(False)
    if base.fp8_base:  # before the move: the device never holds the model at full width
        for part in (denoiser, *text_encoders.values()):
            store_weights_in_fp8(part, dtype)
    for part in (pipe.vae, *text_encoders.values()):  # the UNet stays off the accelerator until the caches are filled
        part.to(device)
    if family.objective == "flow_matching":  # SD3: its own scheduler's config (the shift); sampling keeps pipe.scheduler
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return BaseModel(
        base.model, pipe, family, dtype, torch.device(device), denoiser, text_encoders, noise_scheduler,
        trained=(family.denoiser,), t5_max_length=base.t5_max_length,
    )  # fmt: skip
