"""Tests for sdlora/objective.py: targets, min-SNR weights, noise, the loss and its gradients, caption dropout; kohya's
loss and noise options (Huber / smooth-L1 and their schedules, input perturbation, timestep range, zero terminal SNR,
multi-resolution noise) by formula, as flags, and in a resumed training run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.config import add_arguments, config_from_args
from sdlora.training import network, recipe
from sdlora.training.config import TrainConfig
from sdlora.training.objective import (
    HUBER_SCHEDULES,
    LOSSES,
    ObjectiveConfig,
    diffusion_loss,
    elementwise_loss,
    huber_threshold,
    make_noise,
    min_snr_weights,
    noisy_inputs,
    prepare_noise_scheduler,
    sample_timesteps,
    snr,
    target_for,
    zero_terminal_snr_betas,
)

GAMMA = 5.0


@pytest.fixture
def scheduler(tiny_pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(tiny_pipe.scheduler.config)  # what the trainer builds


def _hand_alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule (beta 0.00085 -> 0.012 over 1000 steps), in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _batch(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # 16x16 latents and 8 tokens: a forward + backward of the tiny UNet well under a second
    return torch.randn(batch, 4, 16, 16, generator=generator), torch.randn(batch, 8, 32, generator=generator)


# ---------------------------------------------------------------- targets and weights


def test_epsilon_and_sample_targets(scheduler):
    latents, _ = _batch()
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([3, 900])
    assert torch.equal(target_for(scheduler, latents, noise, timesteps, "epsilon"), noise)
    assert torch.equal(target_for(scheduler, latents, noise, timesteps, None), noise)  # the scheduler's: epsilon
    assert torch.equal(target_for(scheduler, latents, noise, timesteps, "sample"), latents)
    with pytest.raises(ValueError, match="'flow'"):
        target_for(scheduler, latents, noise, timesteps, "flow")


def test_v_target_is_alpha_noise_minus_sigma_x0(scheduler):
    latents, _ = _batch()
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([17, 640])
    alphas_cumprod = _hand_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
    expected = alphas_cumprod.sqrt() * noise - (1 - alphas_cumprod).sqrt() * latents
    torch.testing.assert_close(target_for(scheduler, latents, noise, timesteps, "v_prediction"), expected.float(), rtol=1e-5, atol=1e-6)


def test_min_snr_weights_match_a_hand_computation(scheduler):
    timesteps = torch.tensor([0, 50, 150, 300, 999])
    alphas_cumprod = _hand_alphas_cumprod()[timesteps]
    hand_snr = alphas_cumprod / (1 - alphas_cumprod)
    torch.testing.assert_close(snr(scheduler, timesteps), hand_snr.float(), rtol=1e-4, atol=0)
    clipped = torch.clamp(hand_snr, max=GAMMA)
    epsilon = min_snr_weights(scheduler, timesteps, GAMMA, "epsilon")
    velocity = min_snr_weights(scheduler, timesteps, GAMMA, "v_prediction")
    torch.testing.assert_close(epsilon, (clipped / hand_snr).float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(velocity, (clipped / (hand_snr + 1)).float(), rtol=1e-4, atol=0)
    assert epsilon[0] < 0.01 and epsilon[-1] == 1.0  # clean steps are down-weighted, noisy ones not
    assert (velocity < 1).all()


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    timesteps = torch.tensor([10, 999])
    assert snr(scheduler, timesteps)[1] == 0
    assert min_snr_weights(scheduler, timesteps, GAMMA, "epsilon")[1] == 1.0  # the limit of min(snr, g) / snr
    assert min_snr_weights(scheduler, timesteps, GAMMA, "v_prediction")[1] == 0.0


# ---------------------------------------------------------------- noise and timesteps


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    latents = torch.zeros(3, 4, 16, 16)
    noise = make_noise(latents, torch.Generator().manual_seed(7), noise_offset=0.1)
    generator = torch.Generator().manual_seed(7)  # the same draws by hand: noise, then the per-channel offset
    expected = torch.randn(latents.shape, generator=generator) + 0.1 * torch.randn(3, 4, 1, 1, generator=generator)
    torch.testing.assert_close(noise, expected)
    plain = make_noise(latents, torch.Generator().manual_seed(7))
    shift = (noise - plain).mean(dim=(2, 3))
    assert (shift.abs() > 1e-4).all() and noise.dtype == torch.float32
    torch.testing.assert_close(noise - plain, shift[:, :, None, None].expand_as(noise), rtol=0, atol=1e-6)


def test_timesteps_come_from_the_generator():
    first = sample_timesteps(4096, 1000, torch.Generator().manual_seed(1), "cpu")
    again = sample_timesteps(4096, 1000, torch.Generator().manual_seed(1), "cpu")
    other = sample_timesteps(4096, 1000, torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.int64 and first.min() >= 0 and first.max() <= 999
    assert first.min() < 10 and first.max() > 990  # uniform over the whole range


# ---------------------------------------------------------------- the loss


def test_loss_matches_a_hand_computation_with_v_target_and_min_snr(tiny_pipe, scheduler):
    latents, embeddings = _batch()
    noise, timesteps = torch.randn_like(latents), torch.tensor([20, 800])
    config = ObjectiveConfig(prediction_type="v_prediction", snr_gamma=GAMMA)
    loss = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, timesteps=timesteps, noise=noise)
    alphas_cumprod = _hand_alphas_cumprod()[timesteps].float().view(-1, 1, 1, 1)
    noisy = alphas_cumprod.sqrt() * latents + (1 - alphas_cumprod).sqrt() * noise
    with torch.no_grad():
        prediction = tiny_pipe.unet(noisy, timesteps, embeddings).sample
    target = alphas_cumprod.sqrt() * noise - (1 - alphas_cumprod).sqrt() * latents
    hand_snr = alphas_cumprod.flatten() / (1 - alphas_cumprod.flatten())
    weights = torch.clamp(hand_snr, max=GAMMA) / (hand_snr + 1)
    expected = (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    assert loss.ndim == 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)


def test_fixed_noise_and_timesteps_give_the_same_loss(tiny_pipe, scheduler):
    latents, embeddings = _batch()
    noise, timesteps = torch.randn_like(latents), torch.tensor([100, 500])
    config = ObjectiveConfig(noise_offset=0.1, snr_gamma=GAMMA)
    with torch.no_grad():
        first = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, timesteps=timesteps, noise=noise)
        second = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, timesteps=timesteps, noise=noise)
        seeded = [
            diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, generator=torch.Generator().manual_seed(s))
            for s in (4, 4, 5)
        ]
    assert first.item() == second.item()
    assert seeded[0].item() == seeded[1].item() != seeded[2].item()


def test_prediction_type_defaults_to_the_schedulers(tiny_pipe):
    from diffusers import DDPMScheduler

    v_scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    latents, embeddings = _batch()
    fixed = {"timesteps": torch.tensor([300, 600]), "noise": torch.randn_like(latents)}
    with torch.no_grad():
        default = diffusion_loss(tiny_pipe.unet, v_scheduler, latents, embeddings, ObjectiveConfig(), **fixed)
        velocity = diffusion_loss(tiny_pipe.unet, v_scheduler, latents, embeddings, ObjectiveConfig("v_prediction"), **fixed)
        epsilon = diffusion_loss(tiny_pipe.unet, v_scheduler, latents, embeddings, ObjectiveConfig("epsilon"), **fixed)
    assert default.item() == velocity.item() != epsilon.item()


def test_loss_is_fp32_when_the_unet_runs_in_bf16(tiny_pipe, scheduler):
    latents, embeddings = _batch()
    fixed = {"timesteps": torch.tensor([300, 600]), "noise": torch.randn_like(latents)}
    with torch.no_grad():
        full = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, ObjectiveConfig(), **fixed)
        tiny_pipe.unet.to(torch.bfloat16)
        half = diffusion_loss(tiny_pipe.unet, scheduler, latents.bfloat16(), embeddings.bfloat16(), ObjectiveConfig(), **fixed)
    assert half.dtype == torch.float32
    assert half.item() != full.item() and half.item() == pytest.approx(full.item(), rel=0.05)


def test_gradients_reach_only_the_lora_parameters(tiny_pipe, scheduler):
    params = network.add_lora(tiny_pipe.unet, network.unet_target_modules(tiny_pipe.unet, "attn"), 4, 8.0)
    latents, embeddings = _batch()
    loss = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    lora_ids = {id(p) for p in params}
    with_grad = {id(p) for p in tiny_pipe.unet.parameters() if p.grad is not None}
    assert with_grad == lora_ids
    lora_b = [p for name, p in tiny_pipe.unet.named_parameters() if ".lora_B." in name]
    assert all(p.grad.abs().sum() > 0 for p in lora_b)  # B is zero at init, its gradient is not


def test_a_few_adamw_steps_overfit_one_batch(tiny_pipe, scheduler):
    params = network.add_lora(
        tiny_pipe.unet, network.unet_target_modules(tiny_pipe.unet, "attn-ff"), 4, 8.0, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    latents, embeddings = _batch()
    fixed = {"timesteps": torch.tensor([200, 700]), "noise": torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))}
    losses = []
    for _ in range(8):
        loss = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, ObjectiveConfig(), **fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # measured: 1.076 -> 0.993, falling at every step
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


# ---------------------------------------------------------------- captions and options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"snr_gamma": 0.0}, "snr_gamma"),
        ({"noise_offset": -0.1}, "noise_offset"),
        ({"loss": "l1"}, "loss"),
        ({"huber_c": 0.0}, "huber_c"),
        ({"huber_c": 1.5}, "huber_c"),
        ({"huber_schedule": "linear"}, "huber_schedule"),
        ({"ip_noise_gamma": -0.1}, "ip_noise_gamma"),
        ({"min_timestep": -1}, "min_timestep"),
        ({"min_timestep": 500, "max_timestep": 100}, "max_timestep"),
        ({"prediction_type": "epsilon", "zero_terminal_snr": True}, "zero-terminal-snr"),
        ({"multires_noise_iterations": -1}, "multires_noise_iterations"),
        ({"multires_noise_discount": 0.0}, "multires_noise_discount"),
    ],
)
def test_objective_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message.replace("_", "-")):  # named as its flag, as every option's error
        ObjectiveConfig(**options)


# ---------------------------------------------------------------- kohya's loss types and Huber schedules


def _pseudo_huber(d: float, c: float) -> float:
    return math.sqrt(d * d + c * c) - c


@pytest.mark.parametrize("c", [0.1, 0.37])
def test_huber_and_smooth_l1_equal_kohyas_formulas(c):
    """kohya's conditional_loss: huber 2c(sqrt(d^2 + c^2) - c), smooth_l1 2(sqrt(d^2 + c^2) - c), l2 d^2."""
    prediction = torch.tensor([[0.0, 0.05, 1.0, -3.0], [0.5, -0.2, 2.0, 0.0]]).view(2, 1, 2, 2)
    target = torch.tensor([[0.0, 0.0, -1.0, 0.5], [0.5, 0.3, 0.0, -0.01]]).view(2, 1, 2, 2)
    per_sample_c = torch.tensor([c, 2 * c / 3])  # a threshold per sample, as the schedules give
    huber = elementwise_loss(prediction, target, "huber", per_sample_c)
    smooth = elementwise_loss(prediction, target, "smooth_l1", per_sample_c)
    l2 = elementwise_loss(prediction, target, "l2")
    for sample in range(2):
        sample_c = per_sample_c[sample].item()
        for p, y, h, s, q in zip(
            prediction[sample].flatten().tolist(),
            target[sample].flatten().tolist(),
            huber[sample].flatten().tolist(),
            smooth[sample].flatten().tolist(),
            l2[sample].flatten().tolist(),
        ):
            assert h == pytest.approx(2 * sample_c * _pseudo_huber(p - y, sample_c), rel=1e-5, abs=1e-7)
            assert s == pytest.approx(2 * _pseudo_huber(p - y, sample_c), rel=1e-5, abs=1e-7)
            assert q == pytest.approx((p - y) ** 2, rel=1e-6)
    # quadratic for small errors, linear (slope 2c) for large ones: a 4 unit error costs far less than under L2
    assert huber[0, 0, 1, 1] < 0.5 * l2[0, 0, 1, 1] and huber[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match="'l1'"):
        elementwise_loss(prediction, target, "l1", per_sample_c)


@pytest.mark.parametrize("c", [0.1, 0.3])
def test_huber_schedules_equal_their_formulas(scheduler, c):
    """kohya's get_huber_threshold_if_needed: constant c; exponential exp(-alpha t), alpha = -ln(c) / 1000;
    snr (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    timesteps = torch.tensor([0, 1, 250, 500, 999])
    alphas_cumprod = _hand_alphas_cumprod()
    constant = huber_threshold(scheduler, timesteps, c, "constant")
    exponential = huber_threshold(scheduler, timesteps, c, "exponential")
    by_snr = huber_threshold(scheduler, timesteps, c, "snr")
    for index, t in enumerate(timesteps.tolist()):
        sigma = math.sqrt((1 - alphas_cumprod[t].item()) / alphas_cumprod[t].item())
        assert constant[index].item() == pytest.approx(c)
        assert exponential[index].item() == pytest.approx(math.exp(math.log(c) / 1000 * t), rel=1e-6)
        assert by_snr[index].item() == pytest.approx((1 - c) / (1 + sigma) ** 2 + c, rel=1e-5)
    assert exponential[0] == 1.0 and exponential[-1] == pytest.approx(c, rel=0.01)  # 1 down to c
    assert by_snr[0] > 0.9 and c < by_snr[-1] < 1.05 * c  # L2-like when clean, about c when noisy
    assert all(constant.dtype == torch.float32 for constant in (constant, exponential, by_snr))
    with pytest.raises(ValueError, match="'linear'"):
        huber_threshold(scheduler, timesteps, c, "linear")


def test_huber_loss_matches_a_hand_computation_with_snr_schedule_and_min_snr(tiny_pipe, scheduler):
    latents, embeddings = _batch()
    noise, timesteps = torch.randn_like(latents), torch.tensor([20, 800])
    c = 0.25
    config = ObjectiveConfig(snr_gamma=GAMMA, loss="huber", huber_c=c, huber_schedule="snr")
    loss = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, timesteps=timesteps, noise=noise)
    alphas_cumprod = _hand_alphas_cumprod()[timesteps].float().view(-1, 1, 1, 1)
    noisy = alphas_cumprod.sqrt() * latents + (1 - alphas_cumprod).sqrt() * noise
    with torch.no_grad():
        prediction = tiny_pipe.unet(noisy, timesteps, embeddings).sample
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    threshold = (1 - c) / (1 + sigmas) ** 2 + c
    elementwise = 2 * threshold * (torch.sqrt((prediction - noise) ** 2 + threshold**2) - threshold)
    hand_snr = alphas_cumprod.flatten() / (1 - alphas_cumprod.flatten())
    expected = (elementwise.mean(dim=(1, 2, 3)) * torch.clamp(hand_snr, max=GAMMA) / hand_snr).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)
    plain = diffusion_loss(
        tiny_pipe.unet, scheduler, latents, embeddings, ObjectiveConfig(snr_gamma=GAMMA), timesteps=timesteps, noise=noise
    )
    assert plain.item() != pytest.approx(loss.item(), rel=1e-3)


# ---------------------------------------------------------------- input perturbation, timestep range, pyramid noise


def test_ip_noise_perturbs_the_input_but_not_the_target(scheduler):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    plain = noisy_inputs(scheduler, latents, ObjectiveConfig(), torch.Generator().manual_seed(11))
    perturbed = noisy_inputs(scheduler, latents, ObjectiveConfig(ip_noise_gamma=0.5), torch.Generator().manual_seed(11))
    assert torch.equal(perturbed[0], plain[0]) and torch.equal(perturbed[2], plain[2])  # same noise (the target), timesteps
    assert not torch.allclose(perturbed[1], plain[1], atol=1e-3)
    generator = torch.Generator().manual_seed(11)  # by hand: noise, timesteps, then the perturbation
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    extra = torch.randn(latents.shape, generator=generator)
    torch.testing.assert_close(perturbed[1], scheduler.add_noise(latents, noise + 0.5 * extra, timesteps))
    assert torch.equal(target_for(scheduler, latents, perturbed[0], perturbed[2], "epsilon"), noise)


def test_timestep_range_keeps_every_draw_in_min_max(scheduler):
    timesteps = sample_timesteps(20_000, 1000, torch.Generator().manual_seed(3), "cpu", 200, 300)
    assert timesteps.min() == 200 and timesteps.max() == 299  # both ends reached, 300 never
    assert timesteps.dtype == torch.int64
    config = ObjectiveConfig(min_timestep=990)  # up to the schedule's end
    drawn = noisy_inputs(scheduler, torch.zeros(4096, 1, 1, 1), config, torch.Generator().manual_seed(4))[2]
    assert drawn.min() == 990 and drawn.max() == 999


def test_multires_noise_is_pyramid_noise_of_unit_std_and_seeded():
    latents = torch.zeros(8, 4, 64, 64)
    first = make_noise(latents, torch.Generator().manual_seed(1), multires_iterations=6, multires_discount=0.8)
    again = make_noise(latents, torch.Generator().manual_seed(1), multires_iterations=6, multires_discount=0.8)
    other = make_noise(latents, torch.Generator().manual_seed(2), multires_iterations=6, multires_discount=0.8)
    white = make_noise(latents, torch.Generator().manual_seed(1))
    assert first.shape == latents.shape and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_correlation(noise: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1].item()

    # the upsampled coarse levels make neighbouring pixels correlate; white noise's do not (measured: 0.27 vs 0.0004)
    assert neighbour_correlation(first) > 0.15 and abs(neighbour_correlation(white)) < 0.02
    # one level by hand: noise, the level's size ratio (unused at level 0: full size), a full-size noise; normalised
    generator = torch.Generator().manual_seed(9)
    noise = torch.randn(latents.shape, generator=generator)
    torch.rand((), generator=generator)
    level = noise + torch.randn(latents.shape, generator=generator)
    one_level = make_noise(latents, torch.Generator().manual_seed(9), multires_iterations=1)
    torch.testing.assert_close(one_level, level / level.std())


def test_drawn_loss_uses_every_option_and_the_fixed_validation_loss_only_the_loss_type(tiny_pipe, scheduler):
    """With drawn inputs every option changes the loss; with fixed noise and timesteps (the validation loss) the
    perturbations (ip noise, pyramid noise, noise offset) and the range do not, the loss type does."""
    latents, embeddings = _batch()
    fixed = {"timesteps": torch.tensor([100, 700]), "noise": torch.randn(latents.shape, generator=torch.Generator().manual_seed(8))}
    options = [
        {"loss": "huber"},
        {"loss": "smooth_l1", "huber_schedule": "constant"},
        {"ip_noise_gamma": 0.3},
        {"min_timestep": 900},
        {"multires_noise_iterations": 3},
    ]

    def losses(config: ObjectiveConfig) -> tuple[float, float]:
        with torch.no_grad():
            drawn = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, generator=torch.Generator().manual_seed(0))
            at_fixed = diffusion_loss(tiny_pipe.unet, scheduler, latents, embeddings, config, **fixed)
        return drawn.item(), at_fixed.item()

    base_drawn, base_fixed = losses(ObjectiveConfig())
    for option in options:
        drawn, at_fixed = losses(ObjectiveConfig(**option))
        assert drawn != base_drawn, option
        assert (at_fixed != base_fixed) == ("loss" in option), option


# ---------------------------------------------------------------- zero terminal SNR


def test_zero_terminal_snr_betas_match_diffusers(tiny_pipe):
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    config = dict(tiny_pipe.scheduler.config) | {"prediction_type": "v_prediction"}
    training = DDPMScheduler.from_config(config)
    original = training.betas.clone()
    prepare_noise_scheduler(training, ObjectiveConfig(zero_terminal_snr=True))
    reference = DDPMScheduler.from_config(config, rescale_betas_zero_snr=True)
    assert abs(training.alphas_cumprod[-1].item()) < 1e-8 and training.alphas_cumprod[-2] > 0
    torch.testing.assert_close(training.betas, reference.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(zero_terminal_snr_betas(original), rescale_zero_terminal_snr(original.clone()), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(training.alphas_cumprod, reference.alphas_cumprod, rtol=1e-6, atol=1e-9)
    assert training.alphas_cumprod[0] == pytest.approx(1 - original[0].item(), rel=1e-6)  # the first step is kept
    assert training.config.rescale_betas_zero_snr is True  # a copy from its config is rescaled too
    assert not torch.equal(training.betas, original)
    assert snr(training, torch.tensor([999]))[0] == 0
    # v at zero SNR is -x0: a finite target and a finite scheduled Huber threshold (c itself)
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(target_for(training, latents, torch.randn_like(latents), torch.tensor([999]), None), -latents)
    assert huber_threshold(training, torch.tensor([999]), 0.1, "snr").item() == pytest.approx(0.1)


def test_zero_terminal_snr_refuses_an_epsilon_model_and_bad_ranges_at_setup(scheduler):
    with pytest.raises(ValueError, match=r"^--zero-terminal-snr needs v-prediction .*predicts epsilon"):
        prepare_noise_scheduler(scheduler, ObjectiveConfig(zero_terminal_snr=True))  # the model's own type: epsilon
    assert scheduler.alphas_cumprod[-1] > 0  # left as it was
    prepare_noise_scheduler(scheduler, ObjectiveConfig(prediction_type="v_prediction", zero_terminal_snr=True))  # forced v
    assert scheduler.alphas_cumprod[-1] == 0
    with pytest.raises(ValueError, match=r"^--max-timestep 1200 .*at most 1000"):
        prepare_noise_scheduler(scheduler, ObjectiveConfig(max_timestep=1200))
    with pytest.raises(ValueError, match=r"^--min-timestep 1000 "):
        prepare_noise_scheduler(scheduler, ObjectiveConfig(min_timestep=1000))


# ---------------------------------------------------------------- the options as flags, hostile values


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["data", "--output", "out", *argv]))


def test_the_options_are_flags_with_kohyas_defaults():
    default = _parse([]).objective
    assert (default.loss, default.huber_c, default.huber_schedule) == ("l2", 0.1, "snr")
    assert (default.ip_noise_gamma, default.min_timestep, default.max_timestep, default.zero_terminal_snr) == (0.0, 0, None, False)
    assert (default.multires_noise_iterations, default.multires_noise_discount) == (0, 0.3)
    config = _parse(["--loss", "smooth_l1", "--huber-c", "0.2", "--huber-schedule", "exponential", "--ip-noise-gamma", "0.1",
                     "--min-timestep", "100", "--max-timestep", "900", "--zero-terminal-snr", "--prediction-type", "v_prediction",
                     "--multires-noise-iterations", "6", "--multires-noise-discount", "0.4"])  # fmt: skip
    assert (config.objective.loss, config.objective.huber_c, config.objective.huber_schedule, config.objective.ip_noise_gamma) == (
        "smooth_l1",
        0.2,
        "exponential",
        0.1,
    )
    assert (config.objective.min_timestep, config.objective.max_timestep, config.objective.zero_terminal_snr) == (100, 900, True)
    assert (config.objective.multires_noise_iterations, config.objective.multires_noise_discount) == (6, 0.4)
    # the choices are the objective's, and the objective section is the ObjectiveConfig the loss takes (not a copy)
    choices = {item.name: item.metadata["choices"] for item in dataclasses.fields(ObjectiveConfig)}
    assert choices["loss"] == LOSSES and choices["huber_schedule"] == HUBER_SCHEDULES
    train_defaults = TrainConfig.from_options(data_dir="d", output_dir="o")
    assert type(train_defaults.objective) is ObjectiveConfig and train_defaults.objective == ObjectiveConfig()


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--huber-c", "0"], "--huber-c"),
        (["--huber-c", "-0.1"], "--huber-c"),
        (["--huber-c", "nan"], "--huber-c"),
        (["--min-timestep", "500", "--max-timestep", "100"], "--max-timestep"),
        (["--timestep-range", "500", "100"], "--max-timestep"),
        (["--min-timestep", "-1"], "--min-timestep"),
        (["--zero-terminal-snr", "--prediction-type", "epsilon"], "--zero-terminal-snr"),
        (["--ip-noise-gamma", "-0.1"], "--ip-noise-gamma"),
        (["--multires-noise-iterations", "-2"], "--multires-noise-iterations"),
        (["--multires-noise-discount", "1.5"], "--multires-noise-discount"),
    ],
)
def test_bad_objective_values_are_one_line_errors_naming_the_option(argv, option):
    with pytest.raises(ValueError, match=f"^{option} ") as caught:
        _parse(argv)
    assert "\n" not in str(caught.value)


def test_timestep_range_sets_both_ends():
    config = _parse(["--timestep-range", "200", "700"])
    assert (config.objective.min_timestep, config.objective.max_timestep) == (200, 700)


def test_an_unknown_loss_is_refused_by_the_flag_and_the_config(capsys):
    with pytest.raises(ValueError, match="^--loss 'bogus' is invalid: it must be one of l2, huber, smooth_l1$"):
        TrainConfig.from_options(data_dir="d", output_dir="o", loss="bogus")  # a TOML file's value
    with pytest.raises(SystemExit):
        _parse(["--loss", "bogus"])
    assert "argument --loss: invalid choice: 'bogus'" in capsys.readouterr().err


# ---------------------------------------------------------------- a training run with every option, resumed


def _lora(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.slow  # three tiny training runs
def test_cli_run_with_every_option_trains_and_resumes_bit_for_bit(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "data", count=4)
    options = ["--prediction-type", "v_prediction", "--zero-terminal-snr", "--loss", "huber", "--huber-c", "0.2",
               "--huber-schedule", "exponential", "--ip-noise-gamma", "0.1", "--min-timestep", "100", "--max-timestep", "900",
               "--multires-noise-iterations", "4", "--multires-noise-discount", "0.5", "--snr-gamma", "5", "--noise-offset", "0.05"]  # fmt: skip
    common = ["--model", "tiny", "--resolution", "64", "--rank", "4", "--alpha", "8", "--batch-size", "2", "--lr", "1e-3",
              "--checkpoint-every", "2", "--validate-every", "0", "--val-split", "0.25", "--sample-steps", "1", "--trigger", "sks", "--seed", "3",
              *options]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(data), "--output", str(straight), "--steps", "4", *common]) == 0
    assert main(["train", str(data), "--output", str(resumed), "--steps", "2", *common]) == 0
    assert main(["train", str(data), "--output", str(resumed), "--steps", "4", "--resume", "latest", *common]) == 0
    expected, actual = _lora(straight), _lora(resumed)
    assert expected.keys() == actual.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    with safe_open(str(straight / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_huber_c"]) == ("huber", "exponential", "0.2")
    assert (metadata["ss_ip_noise_gamma"], metadata["ss_zero_terminal_snr"]) == ("0.1", "True")
    assert (metadata["ss_multires_noise_iterations"], metadata["ss_multires_noise_discount"]) == ("4", "0.5")
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert all(math.isfinite(line.get("loss", line.get("val_loss", 0.0))) for line in lines)
    assert sum("val_loss" in line for line in lines) >= 2  # the base model's and the end's, with every option on
    toml = (straight / "config.toml").read_text()
    assert 'loss = "huber"' in toml and "max_timestep = 900" in toml and "zero_terminal_snr = true" in toml

    # the recipe hands every option to the objective and rescales the training schedule
    config = _parse(options).replace(data_dir=str(data), output_dir=str(tmp_path / "setup"), model="tiny", resolution=64)
    run = recipe.setup(config)
    try:
        assert run.config.objective == _parse(options).objective and run.validator.objective is run.config.objective
        assert run.model.noise_scheduler.alphas_cumprod[-1] == 0 and run.validator.model.noise_scheduler is run.model.noise_scheduler
    finally:
        run.metrics.close()
