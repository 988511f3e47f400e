"""Samplers by name: every A1111 name gives the image of the diffusers scheduler configured by hand as the
mapping documents it; names read back from the PNG; kohya and class names; unknown names are one line."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from sdlora.inference.generation import generate, parse_parameters, read_parameters, save_images
from sdlora.inference.samplers import KOHYA_NAMES, SAMPLERS, find_sampler, sampler_name, set_sampler

_KARRAS, _EXP = {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}
_DPM2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE2M = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_SDE3M = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
# written by hand from diffusers' "A1111 / k-diffusion -> diffusers" table, independently of sdlora's own table
BY_HAND = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", _KARRAS),
    "Euler Exponential": ("EulerDiscreteScheduler", _EXP),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "Heun Karras": ("HeunDiscreteScheduler", _KARRAS),
    "Heun Exponential": ("HeunDiscreteScheduler", _EXP),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 Exponential": ("KDPM2DiscreteScheduler", _EXP),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM2 a Exponential": ("KDPM2AncestralDiscreteScheduler", _EXP),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _DPM2M),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_DPM2M, **_KARRAS}),
    "DPM++ 2M Exponential": ("DPMSolverMultistepScheduler", {**_DPM2M, **_EXP}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", _SDE2M),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE2M, **_KARRAS}),
    "DPM++ 2M SDE Exponential": ("DPMSolverMultistepScheduler", {**_SDE2M, **_EXP}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", _SDE3M),
    "DPM++ 3M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE3M, **_KARRAS}),
    "DPM++ 3M SDE Exponential": ("DPMSolverMultistepScheduler", {**_SDE3M, **_EXP}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", _KARRAS),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "UniPC Karras": ("UniPCMultistepScheduler", _KARRAS),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DEIS Karras": ("DEISMultistepScheduler", _KARRAS),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "DDPM": ("DDPMScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
SEED = 11


def test_the_table_is_the_documented_one():
    assert set(SAMPLERS) == set(BY_HAND)
    for name, (scheduler, options) in BY_HAND.items():
        sampler = SAMPLERS[name]
        assert sampler.scheduler == scheduler, name
        # every option the hand table sets, with the value it sets; the rest of sdlora's options are explicit defaults
        assert {k: sampler.options[k] for k in options} == options, name
        assert all(not value for key, value in sampler.options.items() if key.startswith("use_") and key not in options), name


def _by_hand(pipe, name: str, seed: int):
    scheduler, options = BY_HAND[name]
    extra = {"noise_sampler_seed": seed} if scheduler == "DPMSolverSDEScheduler" else {}  # its Brownian tree's own seed
    return getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options, **extra)


@pytest.mark.slow
def test_every_sampler_gives_the_image_of_its_scheduler_configured_by_hand(tiny_pipe):
    base = tiny_pipe.scheduler
    images = {}
    for name in SAMPLERS:
        tiny_pipe.scheduler = base
        (ours,) = generate(tiny_pipe, "a red circle", steps=4, seed=SEED, sampler=name, progress=False)
        assert sampler_name(tiny_pipe.scheduler) == name
        assert parse_parameters(ours.info["parameters"])["Sampler"] == name
        tiny_pipe.scheduler = _by_hand(tiny_pipe, name, SEED)
        generator = torch.Generator().manual_seed(SEED)
        (hand,) = tiny_pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, generator=[generator]).images
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(hand), err_msg=name)
        images[name] = np.asarray(ours)
    # the samplers are not all one: Karras sigmas and ancestral noise change the picture
    assert not np.array_equal(images["Euler"], images["Euler Karras"])
    assert not np.array_equal(images["Euler"], images["Euler a"])
    assert not np.array_equal(images["DPM++ 2M"], images["DPM++ 2M SDE"])


def test_dpm_sde_images_are_each_redoable_alone(tiny_pipe):
    batch = generate(tiny_pipe, "a cat", steps=3, seed=5, num_images=2, sampler="DPM++ SDE Karras", progress=False)
    again = generate(tiny_pipe, "a cat", steps=3, seed=6, num_images=1, progress=False)  # the sampler stays set
    np.testing.assert_array_equal(np.asarray(batch[1]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_png_parameters_read_back_the_sampler(tiny_pipe, tmp_path):
    (image,) = generate(tiny_pipe, "a cat", steps=2, seed=3, sampler="DPM++ 2M Karras", progress=False)
    (path,) = save_images([image], tmp_path, grid=False)
    recorded = parse_parameters(read_parameters(path))["Sampler"]
    assert recorded == "DPM++ 2M Karras"
    scheduler = find_sampler(recorded).build(tiny_pipe.scheduler.config)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.config.use_karras_sigmas


def test_a_sampler_sets_every_option_it_implies_over_the_models_config(tiny_pipe):
    # a model that ships DPM++ 2M SDE Karras: "Euler" must not inherit Karras sigmas, "DPM++ 2M" not the SDE
    tiny_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        tiny_pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"
    )
    assert sampler_name(tiny_pipe.scheduler) == "DPM++ 2M SDE Karras"
    model_config = tiny_pipe.scheduler.config
    assert set_sampler(tiny_pipe, "Euler").name == "Euler" and not tiny_pipe.scheduler.config.use_karras_sigmas
    tiny_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(model_config)
    set_sampler(tiny_pipe, "DPM++ 2M")
    assert tiny_pipe.scheduler.config.algorithm_type == "dpmsolver++" and not tiny_pipe.scheduler.config.use_karras_sigmas
    # what the model learnt stays: its betas and prediction type
    assert tiny_pipe.scheduler.config.beta_schedule == model_config.beta_schedule
    assert tiny_pipe.scheduler.config.prediction_type == model_config.prediction_type


def test_kohya_names_case_and_class_names():
    assert find_sampler("euler_a").name == "Euler a"
    assert find_sampler("k_dpm_2_a").name == "DPM2 a"
    assert find_sampler("dpmsolver++").name == "DPM++ 2M"
    assert set(KOHYA_NAMES) >= {"ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver++", "dpmsingle"}
    assert find_sampler("dpm++ 2m  karras").name == "DPM++ 2M Karras"
    single = find_sampler("dpmsingle")
    assert single.scheduler == "DPMSolverSinglestepScheduler"
    assert find_sampler("DPMSolverSinglestep").scheduler == "DPMSolverSinglestepScheduler"  # as a PNG records it
    assert find_sampler("EulerDiscreteScheduler").scheduler == "EulerDiscreteScheduler"


def test_an_unknown_sampler_is_one_line_listing_the_known():
    with pytest.raises(ValueError) as caught:
        find_sampler("Eulr a")
    message = str(caught.value)
    assert "\n" not in message and "did you mean 'Euler a'" in message and "DPM++ 2M Karras" in message
