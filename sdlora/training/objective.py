"""The training objective of both kinds: diffusion (SD1/SD2/SDXL: timesteps, noise, the target the UNet learns,
min-SNR weights) and flow matching (SD3: a noise level sigma drawn from a density and shifted, the straight path
(1 - sigma) x0 + sigma noise, the velocity noise - x0 as target, optional output preconditioning and sigma weights);
the loss of each.

All randomness comes from the `torch.Generator` passed in, so a run (and a resumed run that reseeds it) draws the
same timesteps and noise. The options follow kohya's sd-scripts (`library/train_util.py`,
`library/custom_train_functions.py`): L2 / Huber / smooth-L1 losses with a timestep-scheduled Huber threshold,
noise offset, multi-resolution (pyramid) noise, input-perturbation noise, a timestep range and zero terminal SNR.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .config import FLOW_WEIGHTINGS, HUBER_SCHEDULES, LOSSES, TIMESTEP_SAMPLINGS, ZERO_TERMINAL_SNR_EPSILON, ObjectiveConfig

# the options of flow matching (SD3) only, and their defaults: a diffusion model refuses them when set
FLOW_ONLY = (
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "sigmoid_scale",
    "flow_shift",
    "flow_weighting",
    "precondition_outputs",
)
FLOW_DEFAULTS = {item.name: item.default for item in dataclasses.fields(ObjectiveConfig) if item.name in FLOW_ONLY}

# the targets a scheduler may predict (training takes the first two: the objective section's prediction_type)
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

    def transformer_kwargs(self) -> dict:
        """The keyword arguments SD3's SD3Transformer2DModel takes them as (text tokens, pooled text)."""
        return {"encoder_hidden_states": self.hidden, "pooled_projections": self.pooled}


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    generator: torch.Generator | None,
    device: torch.device | str,
    low: int = 0,
    high: int | None = None,
) -> torch.Tensor:
    """`batch` timesteps drawn uniformly from [low, high) (default [0, num_train_timesteps)), as int64 on `device`.

    kohya's `--min_timestep` / `--max_timestep` (train_util.get_timesteps: `torch.randint(min, max)`)."""
    high = num_train_timesteps if high is None else high
    timesteps = torch.randint(low, high, (batch,), generator=generator, device=_generator_device(generator))
    return timesteps.to(device)


def make_noise(
    latents: torch.Tensor,
    generator: torch.Generator | None,
    noise_offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> torch.Tensor:
    """Gaussian noise shaped like `latents` (fp32, on their device), plus noise_offset * N(0, 1) per sample and channel,
    then (with multires_iterations) turned into pyramid noise; kohya's order: offset first, pyramid second."""
    device = _generator_device(generator)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        # a constant shift per channel lets the model learn to change an image's overall brightness
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device, dtype=torch.float32)
        noise = noise + noise_offset * offset
    if multires_iterations:
        noise = multires_noise(noise, generator, multires_iterations, multires_discount)
    return noise.to(latents.device)


def multires_noise(noise: torch.Tensor, generator: torch.Generator | None, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution (pyramid) noise, as kohya's `custom_train_functions.pyramid_noise_like`.

    Level i is Gaussian noise at 1/r^i of the size (r drawn from [2, 4) per level), upsampled bilinearly and added with
    weight discount^i (level 0: a second full-size noise); it stops at a 1-pixel side. The sum is divided by its std
    (over the whole batch) to unit variance. Its low frequencies let a LoRA change large areas (contrast, colour).
    All draws come from `generator`, on its device; the result is fp32 there.
    """
    device = _generator_device(generator)
    batch, channels, height, width = noise.shape
    total = noise.to(device, torch.float32)
    for level in range(iterations):
        ratio = 2.0 + 2.0 * torch.rand((), generator=generator, device=device).item()
        low_height, low_width = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        low = torch.randn((batch, channels, low_height, low_width), generator=generator, device=device, dtype=torch.float32)
        total = total + F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False) * discount**level
        if low_height == 1 or low_width == 1:
            break
    return total / total.std()


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
    raise UserError(f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each timestep, fp32 on the timesteps' device."""
    # float64 on the CPU (MPS has no float64): 1 - alpha_bar loses digits in fp32 at small t. The table of every
    # timestep goes to the device and is indexed there: no copy of the timesteps back to the host (a synchronisation)
    alphas_cumprod = scheduler.alphas_cumprod.to("cpu", torch.float64)
    return _per_timestep(alphas_cumprod / (1.0 - alphas_cumprod), timesteps)


def _per_timestep(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """`table[timesteps]` in fp32 on the timesteps' device: the table (one value per timestep, computed on the CPU)
    is cast and copied there, so the timesteps never travel back to the host."""
    return table.to(timesteps.device, torch.float32)[timesteps]


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
    raise UserError(f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def huber_threshold(scheduler, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
    """The Huber threshold c(t) of each timestep, fp32 on the timesteps' device (kohya's
    `train_util.get_huber_threshold_if_needed`, huber_scale 1):

    constant: huber_c; exponential: exp(-alpha * t) with alpha = -ln(huber_c) / num_train_timesteps (1 at t = 0,
    huber_c at t = num_train_timesteps); snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c with
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (about 1, L2-like, at clean timesteps; huber_c at noisy ones).
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        count = scheduler.config.num_train_timesteps
        alpha = -math.log(huber_c) / count
        return _per_timestep(torch.exp(-alpha * torch.arange(count, dtype=torch.float64)), timesteps)
    if schedule == "snr":
        # float64 on the CPU, as snr(); alpha_bar 0 (zero terminal SNR) gives sigma inf and c = huber_c
        alphas_cumprod = scheduler.alphas_cumprod.to("cpu", torch.float64)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        return _per_timestep((1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c, timesteps)
    raise UserError(f"unknown huber_schedule {schedule!r}: use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss: str, huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each element, as kohya's `train_util.conditional_loss` (reduction "none"); huber_c is per sample.

    l2: (p - y)^2; huber: 2 c (sqrt((p - y)^2 + c^2) - c) (pseudo-Huber: about (p - y)^2 for small errors, 2 c |p - y|
    for large ones); smooth_l1: 2 (sqrt((p - y)^2 + c^2) - c) (the same without the factor c: about (p - y)^2 / c, then
    2 |p - y|).
    """
    if loss == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    c = huber_c.view(-1, *([1] * (prediction.ndim - 1)))
    pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * pseudo if loss == "huber" else 2 * pseudo


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1; diffusers' `rescale_zero_terminal_snr`, kohya's `fix_noise_scheduler_betas_for_zero_terminal_snr`):
    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first stays, then turned back into betas."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def prepare_noise_scheduler(scheduler, config: ObjectiveConfig) -> None:
    """Check the options against the training noise scheduler and apply --zero-terminal-snr to it, in place.

    The timestep range must fit the schedule; zero terminal SNR needs v-prediction (the option's or the scheduler's),
    and then rescales the betas (alphas, alphas_cumprod follow), recorded in the scheduler's config as diffusers'
    `rescale_betas_zero_snr`."""
    for name in FLOW_ONLY:
        if getattr(config, name) != FLOW_DEFAULTS[name]:
            raise UserError(f"--{name.replace('_', '-')} is for flow-matching models (SD3); this model trains by diffusion: drop it")
    count = scheduler.config.num_train_timesteps
    high = count if config.max_timestep is None else config.max_timestep
    if high > count:
        raise UserError(f"--max-timestep {high} is invalid: the noise schedule has {count} timesteps, so it must be at most {count}")
    if config.min_timestep >= high:
        raise UserError(f"--min-timestep {config.min_timestep} is invalid: it must be below --max-timestep ({high})")
    if not config.zero_terminal_snr:
        return
    if _prediction_type(scheduler, config.prediction_type) == "epsilon":
        raise UserError(ZERO_TERMINAL_SNR_EPSILON + " (the model's scheduler predicts epsilon)")
    scheduler.betas = zero_terminal_snr_betas(scheduler.betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.register_to_config(rescale_betas_zero_snr=True)


def noisy_inputs(
    scheduler,
    latents: torch.Tensor,
    config: ObjectiveConfig,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, noisy latents, timesteps) for fp32 `latents`: the noise is the target's, the noisy latents the UNet's input.

    Drawn from `generator` in this order: the noise (with its offset and pyramid levels), the timesteps (in
    [min_timestep, max_timestep)), then with ip_noise_gamma the input perturbation: the noisy latents are made from
    noise + ip_noise_gamma * N(0, 1) while the target keeps the noise (kohya's `get_noise_noisy_latents_and_timesteps`).
    Given noise is used as is: no offset, pyramid or perturbation (the validation loss's fixed inputs).
    """
    drawn = noise is None
    if drawn:
        noise = make_noise(latents, generator, config.noise_offset, config.multires_noise_iterations, config.multires_noise_discount)
    noise = noise.to(latents.device, torch.float32)
    if timesteps is None:
        count = scheduler.config.num_train_timesteps
        timesteps = sample_timesteps(latents.shape[0], count, generator, latents.device, config.min_timestep, config.max_timestep)
    timesteps = timesteps.to(latents.device)
    noised_with = noise
    if drawn and config.ip_noise_gamma:
        device = _generator_device(generator)
        perturbation = torch.randn(noise.shape, generator=generator, device=device, dtype=torch.float32).to(noise.device)
        noised_with = noise + config.ip_noise_gamma * perturbation
    return noise, scheduler.add_noise(latents, noised_with, timesteps), timesteps


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Loss masks [batch, 1, H, W] at pixel size brought to the latent grid `size` (h, w) by area averaging, as
    kohya's apply_masked_loss resizes them (`interpolate(mode="area")`): each latent pixel weighs the mean of the
    mask over the pixels it covers."""
    return F.interpolate(mask.float(), size=tuple(size), mode="area")


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    conditioning: Conditioning | torch.Tensor,
    config: ObjectiveConfig,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    flow_matching: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of the model's kind: `flow_matching_loss` for a flow-matching model (SD3), else the diffusion
    loss below.

    Mean (optionally min-SNR-weighted) loss (`config.loss`) between the UNet's prediction and its target, as a scalar.
    `weights` weigh each image's loss in that mean (kohya's loss_weights: --prior-loss-weight for regularization
    images): mean_i(w_i * loss_i). `mask` ([batch, 1, h, w] on the latent grid, in [0, 1]) weighs each latent
    pixel's loss before the mean over the image, as kohya's masked_loss (custom_train_functions.apply_masked_loss:
    `loss * mask`, then the plain mean over channels and pixels, not renormalised by the mask's area).

    Noise and timesteps are drawn from `generator` unless given (given noise is used as is, without noise offset,
    pyramid noise or input perturbation; given timesteps ignore the timestep range): fixed ones make the loss
    deterministic, as the validation loss needs. The UNet runs in the dtype of `latents` (the caller's
    mixed-precision dtype); noising, target and loss are computed in fp32.
    """
    if flow_matching:
        return flow_matching_loss(unet, scheduler, latents, conditioning, config, generator, timesteps, noise, weights, mask)
    prediction_type = _prediction_type(scheduler, config.prediction_type)
    clean = latents.to(torch.float32)
    noise, noisy, timesteps = noisy_inputs(scheduler, clean, config, generator, timesteps, noise)
    if isinstance(conditioning, torch.Tensor):  # the text alone (SD1/SD2)
        conditioning = Conditioning(conditioning)
    prediction = unet(
        noisy.to(latents.dtype), timesteps, **conditioning.to(latents.device, latents.dtype).unet_kwargs(), return_dict=False
    )[0]
    target = target_for(scheduler, clean, noise, timesteps, prediction_type)
    huber_c = None if config.loss == "l2" else huber_threshold(scheduler, timesteps, config.huber_c, config.huber_schedule)
    elementwise = elementwise_loss(prediction.float(), target, config.loss, huber_c)
    if mask is not None:
        elementwise = elementwise * mask.to(elementwise.device, elementwise.dtype)
    per_sample = elementwise.mean(dim=tuple(range(1, target.ndim)))
    if config.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, config.snr_gamma, prediction_type)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


# ---------------------------------------------------------------- flow matching (SD3)


def timestep_density(config: ObjectiveConfig, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """`batch` draws u in [0, 1] of `config.timestep_sampling`, fp32 on the generator's device: the same numbers as
    diffusers' `training_utils.compute_density_for_timestep_sampling` (and kohya's copy in `sd3_train_utils`) for the
    same generator state. logit_normal: sigmoid(N(mean, std)); mode: 1 - u - scale (cos^2(pi u / 2) - 1 + u) of a
    uniform u; uniform; sigmoid: sigmoid(scale N(0, 1)) (kohya's flux_train_utils)."""
    device = _generator_device(generator)
    sampling = config.timestep_sampling
    if sampling == "logit_normal":
        normal = torch.normal(mean=config.logit_mean, std=config.logit_std, size=(batch,), device=device, generator=generator)
        return torch.sigmoid(normal)
    if sampling == "sigmoid":
        return torch.sigmoid(config.sigmoid_scale * torch.randn((batch,), device=device, generator=generator))
    if sampling not in TIMESTEP_SAMPLINGS:
        raise UserError(f"unknown timestep_sampling {sampling!r}: use one of {', '.join(TIMESTEP_SAMPLINGS)}")
    u = torch.rand((batch,), device=device, generator=generator)
    if sampling == "mode":
        return 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """shift s / (1 + (shift - 1) s): the time shift of SD3's scheduler (FlowMatchEulerDiscreteScheduler's `shift`) and
    kohya's --training_shift; 1 leaves sigma alone, above 1 moves it towards noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(scheduler, config: ObjectiveConfig, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """`batch` noise levels sigma in (0, 1], fp32 on `device`: the density's u (as the SD3 paper and kohya read it,
    u is the noise level; diffusers indexes its descending table with u, which is 1 - u, the same for the symmetric
    defaults), shifted (`--flow-shift`, else the scheduler's), then put in [min_timestep, max_timestep) / 1000 as
    kohya does. Continuous (kohya rounds down to t / 1000, diffusers to its table's 1000 values), floored at one
    step, 1 / num_train_timesteps, so sigma_sqrt's 1 / sigma^2 stays finite."""
    count = scheduler.config.num_train_timesteps
    shift = config.flow_shift if config.flow_shift is not None else float(scheduler.config.get("shift", 1.0))
    sigmas = shift_sigmas(timestep_density(config, batch, generator), shift)
    low, high = config.min_timestep / count, (count if config.max_timestep is None else config.max_timestep) / count
    return (low + sigmas * (high - low)).clamp(min=1.0 / count).to(device)


def flow_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Each sample's loss weight from its sigma, as diffusers' `compute_loss_weighting_for_sd3`: none 1, sigma_sqrt
    1 / sigma^2, cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2))."""
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise UserError(f"unknown flow_weighting {weighting!r}: use one of {', '.join(FLOW_WEIGHTINGS)}")


# options of the diffusion objective that have no meaning for flow matching, with their default
_DIFFUSION_ONLY = {"prediction_type": None, "snr_gamma": None, "zero_terminal_snr": False}


def prepare_flow_scheduler(scheduler, config: ObjectiveConfig) -> None:
    """Check the options against a flow-matching model's scheduler: the timestep range fits, no diffusion-only option
    is set, a Huber loss has a constant threshold (its snr and exponential schedules are for diffusion), and the
    shift is a fixed one (SD3's; FLUX's resolution-dependent shifting is not trained here)."""
    for name, default in _DIFFUSION_ONLY.items():
        if getattr(config, name) != default:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is for diffusion models (SD1/SD2/SDXL); SD3 trains by flow matching: drop it (see --flow-weighting)")
    if config.loss != "l2" and config.huber_schedule != "constant":
        raise UserError(f"--loss {config.loss} with flow matching (SD3) needs --huber-schedule constant")
    if scheduler.config.get("use_dynamic_shifting", False):
        raise UserError("this model's scheduler shifts by resolution (use_dynamic_shifting): sdlora trains SD3's fixed shift only")
    count = scheduler.config.num_train_timesteps
    high = count if config.max_timestep is None else config.max_timestep
    if high > count:
        raise UserError(f"--max-timestep {high} is invalid: the noise schedule has {count} timesteps, so it must be at most {count}")


def flow_matching_loss(
    transformer,
    scheduler,
    latents: torch.Tensor,
    conditioning: Conditioning,
    config: ObjectiveConfig,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flow-matching loss (diffusers' train_dreambooth_lora_sd3.py, kohya's sd3_train.py), a scalar: the input
    (1 - sigma) x0 + sigma noise at timestep 1000 sigma, the target noise - x0 (with `precondition_outputs`, the
    prediction turned into x0 = input - sigma prediction and compared with x0), each latent pixel weighted by `mask`
    (as in `diffusion_loss`; kohya's SD3 trainer applies the same apply_masked_loss), each sample by
    `flow_weighting` and `weights`. Draws from `generator`: noise (offset, pyramid), sigma, then the input
    perturbation; given `timesteps` (1000 sigma) and noise are used as is (the validation loss). The transformer
    runs in the dtype of `latents`; the rest in fp32."""
    clean = latents.to(torch.float32)
    drawn = noise is None
    if drawn:
        noise = make_noise(clean, generator, config.noise_offset, config.multires_noise_iterations, config.multires_noise_discount)
    noise = noise.to(clean.device, torch.float32)
    count = scheduler.config.num_train_timesteps
    if timesteps is None:
        sigmas = sample_sigmas(scheduler, config, clean.shape[0], generator, clean.device)
    else:
        sigmas = timesteps.to(clean.device, torch.float32) / count
    noised_with = noise
    if drawn and config.ip_noise_gamma:
        device = _generator_device(generator)
        perturbation = torch.randn(noise.shape, generator=generator, device=device, dtype=torch.float32).to(noise.device)
        noised_with = noise + config.ip_noise_gamma * perturbation
    sigma = sigmas.view(-1, *([1] * (clean.ndim - 1)))
    noisy = (1.0 - sigma) * clean + sigma * noised_with
    prediction = transformer(
        hidden_states=noisy.to(latents.dtype),
        timestep=sigmas * count,
        **conditioning.to(latents.device, latents.dtype).transformer_kwargs(),
        return_dict=False,
    )[0].float()
    if config.precondition_outputs:  # diffusers' EDM-style preconditioning: the x0 the velocity implies
        prediction, target = noisy - sigma * prediction, clean
    else:
        target = noise - clean
    huber_c = None if config.loss == "l2" else torch.full(sigmas.shape, config.huber_c, device=sigmas.device)
    elementwise = elementwise_loss(prediction, target, config.loss, huber_c)
    if mask is not None:
        elementwise = elementwise * mask.to(elementwise.device, elementwise.dtype)
    per_sample = elementwise.mean(dim=tuple(range(1, target.ndim)))
    per_sample = per_sample * flow_weights(config.flow_weighting, sigmas)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
