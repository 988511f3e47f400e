"""Tests for sdlora/training/objective.py's flow matching (SD3): the timestep densities and loss weights equal
diffusers' `training_utils` for the same seed, the shift and range, the noisy input and target, preconditioning,
and the options each kind of model refuses."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdlora.errors import UserError
from sdlora.training.config import ObjectiveConfig
from sdlora.training.objective import (
    Conditioning,
    flow_matching_loss,
    flow_weights,
    prepare_flow_scheduler,
    prepare_noise_scheduler,
    sample_sigmas,
    shift_sigmas,
    timestep_density,
)


@pytest.mark.parametrize(
    ("sampling", "options"),
    [("logit_normal", {"logit_mean": 0.3, "logit_std": 1.7}), ("mode", {"mode_scale": 1.29}), ("uniform", {})],
)
def test_timestep_density_equals_diffusers_for_the_same_seed(sampling, options):
    config = ObjectiveConfig(timestep_sampling=sampling, **options)
    ours = timestep_density(config, 4096, torch.Generator().manual_seed(7))
    theirs = compute_density_for_timestep_sampling(
        sampling, 4096, logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert torch.equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() <= 1 and ours.std() > 0.1


def test_sigmoid_sampling_is_kohyas_scaled_normal():
    config = ObjectiveConfig(timestep_sampling="sigmoid", sigmoid_scale=2.5)
    expected = torch.sigmoid(2.5 * torch.randn((64,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(timestep_density(config, 64, torch.Generator().manual_seed(3)), expected)


def test_loss_weightings_equal_diffusers():
    sigmas = torch.linspace(0.01, 1.0, 50)
    for weighting in ("none", "sigma_sqrt", "cosmap"):
        expected = compute_loss_weighting_for_sd3(weighting, sigmas)
        assert torch.allclose(flow_weights(weighting, sigmas), expected, rtol=1e-6), weighting
    assert flow_weights("sigma_sqrt", torch.tensor([0.5])).item() == pytest.approx(4.0)


def test_shift_matches_the_sd3_scheduler_table():
    """The scheduler's own shifted sigmas (FlowMatchEulerDiscreteScheduler, shift 3) are shift_sigmas of the plain ones."""
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    assert torch.allclose(shift_sigmas(plain, 3.0), shifted, atol=1e-6)


def test_sample_sigmas_uses_the_schedulers_shift_unless_told_and_the_range():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    config = ObjectiveConfig(timestep_sampling="uniform")
    u = timestep_density(config, 256, torch.Generator().manual_seed(1)).clamp(min=1e-3)
    default = sample_sigmas(scheduler, config, 256, torch.Generator().manual_seed(1), "cpu")
    assert torch.allclose(default, (3 * u / (1 + 2 * u)).clamp(min=1e-3))
    unshifted = sample_sigmas(
        scheduler, ObjectiveConfig(timestep_sampling="uniform", flow_shift=1.0), 256, torch.Generator().manual_seed(1), "cpu"
    )
    assert torch.allclose(unshifted, u)
    ranged = ObjectiveConfig(timestep_sampling="uniform", flow_shift=1.0, min_timestep=200, max_timestep=600)
    sigmas = sample_sigmas(scheduler, ranged, 256, torch.Generator().manual_seed(1), "cpu")
    assert sigmas.min() >= 0.2 and sigmas.max() <= 0.6 and torch.allclose(sigmas, 0.2 + 0.4 * u, atol=1e-6)


class _Velocity(torch.nn.Module):
    """A stand-in transformer: returns a fixed multiple of its input and records what it was given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.seen: dict = {}

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        self.seen = {"timestep": timestep, "hidden": encoder_hidden_states, "pooled": pooled_projections, "input": hidden_states}
        return (hidden_states * self.scale,)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 6, 5, generator=generator)
    noise = torch.randn(3, 4, 6, 5, generator=generator)
    conditioning = Conditioning(torch.randn(3, 7, 12, generator=generator), torch.randn(3, 9, generator=generator))
    return latents, noise, conditioning


def test_flow_loss_input_target_and_weighting():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    latents, noise, conditioning = _inputs()
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    model = _Velocity()
    loss = flow_matching_loss(
        model, scheduler, latents, conditioning, ObjectiveConfig(flow_weighting="cosmap"), timesteps=timesteps, noise=noise
    )
    noisy = (1 - sigma) * latents + sigma * noise
    assert torch.allclose(model.seen["input"], noisy) and torch.equal(model.seen["timestep"], timesteps)
    assert torch.equal(model.seen["pooled"], conditioning.pooled)
    per_sample = ((0.5 * noisy - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * compute_loss_weighting_for_sd3("cosmap", timesteps / 1000)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert model.scale.grad is not None and model.scale.grad.abs() > 0


def test_preconditioning_weighs_the_velocity_error_by_sigma_squared():
    """diffusers' --precondition_outputs: |(x_t - sigma v_pred) - x0|^2 = sigma^2 |v_pred - (noise - x0)|^2."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    latents, noise, conditioning = _inputs()
    timesteps = torch.tensor([250.0, 250.0, 250.0])
    plain = flow_matching_loss(_Velocity(), scheduler, latents, conditioning, ObjectiveConfig(), timesteps=timesteps, noise=noise)
    conditioned = flow_matching_loss(
        _Velocity(), scheduler, latents, conditioning, ObjectiveConfig(precondition_outputs=True), timesteps=timesteps, noise=noise
    )
    assert conditioned.item() == pytest.approx(0.25**2 * plain.item(), rel=1e-5)


def test_flow_loss_takes_the_loss_mask_as_kohya_applies_it():
    """--masked-loss under flow matching: loss * mask per latent pixel, then the plain mean (not renormalised); the
    masked pixels' latents and noise do not reach the loss or the gradient."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    latents, noise, conditioning = _inputs()
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    mask = torch.zeros(3, 1, 6, 5)
    mask[..., :3, :] = 1.0  # the top half counts
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)

    def loss_and_grad(latents, noise):
        model = _Velocity()
        loss = flow_matching_loss(model, scheduler, latents, conditioning, ObjectiveConfig(), timesteps=timesteps, noise=noise, mask=mask)
        loss.backward()
        return loss, model.scale.grad

    loss, grad = loss_and_grad(latents, noise)
    noisy = (1 - sigma) * latents + sigma * noise
    expected = (((0.5 * noisy - (noise - latents)) ** 2) * mask).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed_latents, changed_noise = latents.clone(), noise.clone()
    changed_latents[..., 3:, :] += 5.0
    changed_noise[..., 3:, :] -= 3.0
    loss2, grad2 = loss_and_grad(changed_latents, changed_noise)
    assert loss2.item() == loss.item() and torch.equal(grad2, grad)


def test_flow_loss_draws_are_seeded():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    latents, _, conditioning = _inputs()
    config = ObjectiveConfig(ip_noise_gamma=0.1, noise_offset=0.05)
    first = flow_matching_loss(_Velocity(), scheduler, latents, conditioning, config, torch.Generator().manual_seed(5))
    again = flow_matching_loss(_Velocity(), scheduler, latents, conditioning, config, torch.Generator().manual_seed(5))
    other = flow_matching_loss(_Velocity(), scheduler, latents, conditioning, config, torch.Generator().manual_seed(6))
    assert first.item() == again.item() != other.item()
    assert math.isfinite(first.item())


def test_each_kind_refuses_the_others_options():
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    prepare_flow_scheduler(flow, ObjectiveConfig(timestep_sampling="mode", flow_weighting="sigma_sqrt"))
    with pytest.raises(UserError, match="--snr-gamma is for diffusion"):
        prepare_flow_scheduler(flow, ObjectiveConfig(snr_gamma=5.0))
    with pytest.raises(UserError, match="huber-schedule constant"):
        prepare_flow_scheduler(flow, ObjectiveConfig(loss="huber"))
    from diffusers import DDPMScheduler

    with pytest.raises(UserError, match="--flow-weighting is for flow-matching"):
        prepare_noise_scheduler(DDPMScheduler(), ObjectiveConfig(flow_weighting="cosmap"))
    with pytest.raises(UserError, match="--mode-scale 2.0 is invalid"):
        ObjectiveConfig(mode_scale=2.0)
