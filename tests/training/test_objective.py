"""Tests for sdlora/objective.py: targets, min-SNR weights, noise, the loss and its gradients, caption dropout."""

from __future__ import annotations

import pytest
import torch

from sdlora.training import network
from sdlora.training.objective import (
    ObjectiveConfig,
    diffusion_loss,
    make_noise,
    min_snr_weights,
    sample_timesteps,
    snr,
    target_for,
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
    [({"prediction_type": "flow"}, "prediction_type"), ({"snr_gamma": 0.0}, "snr_gamma"), ({"noise_offset": -0.1}, "noise_offset")],
)
def test_objective_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**options)
