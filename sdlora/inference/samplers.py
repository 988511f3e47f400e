"""Samplers by the names people use: AUTOMATIC1111's ("DPM++ 2M Karras", "Euler a"), kohya's sample-prompt names
(`euler_a`, `k_dpm_2`) and diffusers' own class names, each mapped to a diffusers scheduler with its options.

The mapping follows the table in diffusers' scheduler documentation ("A1111 / k-diffusion -> diffusers"), with two
choices of ours where that table has none or is loose: "DPM++ SDE" is `DPMSolverSDEScheduler` (the stochastic
solver k-diffusion's `sample_dpmpp_sde` is, not the deterministic single-step solver), and "PLMS" is `PNDMScheduler`
without its Runge-Kutta warm-up steps (`skip_prk_steps`, as A1111's PLMS). Every option a sampler implies is set
explicitly, the defaults included, so a model whose scheduler config already says `use_karras_sigmas` does not
turn "Euler" into Euler Karras. The rest of the model's scheduler config (betas, prediction type, timestep
spacing) is kept: a sampler is how to solve, not what the model learnt.

Models trained by flow matching (SD3) sample with their own `FlowMatchEulerDiscreteScheduler`: "Euler" names it
there (as ComfyUI's euler does on such a model); the noise-prediction samplers would solve the wrong equation, so
they are refused in one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Sampler:
    """A sampler: its A1111 name, the diffusers scheduler class and the options that make it that sampler."""

    name: str
    scheduler: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self, scheduler_config: Mapping[str, Any]):
        """The scheduler for a model whose scheduler config is `scheduler_config`."""
        import diffusers  # lazy: diffusers takes seconds to import, and the table is read by --help and errors

        scheduler_class = getattr(diffusers, self.scheduler)
        return scheduler_class.from_config(dict(scheduler_config), **self.options)


_NO_SIGMA_SCHEDULE = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
# A1111's schedule types, as the suffix of its older sampler names ("DPM++ 2M Karras"); v1.9+ writes them as a
# separate "Schedule type" but still reads the suffixed names
_SCHEDULES = {"Karras": {"use_karras_sigmas": True}, "Exponential": {"use_exponential_sigmas": True}}

# A1111 name: (diffusers class, options, the schedule suffixes it takes)
_BASE: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "Euler": ("EulerDiscreteScheduler", _NO_SIGMA_SCHEDULE, ("Karras", "Exponential")),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, ()),
    "Heun": ("HeunDiscreteScheduler", _NO_SIGMA_SCHEDULE, ("Karras", "Exponential")),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}, ("Karras",)),
    "DPM2": ("KDPM2DiscreteScheduler", _NO_SIGMA_SCHEDULE, ("Karras", "Exponential")),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _NO_SIGMA_SCHEDULE, ("Karras", "Exponential")),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, **_NO_SIGMA_SCHEDULE},
        ("Karras", "Exponential"),
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_NO_SIGMA_SCHEDULE},
        ("Karras", "Exponential"),
    ),
    "DPM++ 3M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, **_NO_SIGMA_SCHEDULE},
        ("Karras", "Exponential"),
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}, ("Karras",)),
    "UniPC": ("UniPCMultistepScheduler", _NO_SIGMA_SCHEDULE, ("Karras",)),
    "DEIS": ("DEISMultistepScheduler", _NO_SIGMA_SCHEDULE, ("Karras",)),
    "DDIM": ("DDIMScheduler", {}, ()),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}, ()),
    "DDPM": ("DDPMScheduler", {}, ()),
    "LCM": ("LCMScheduler", {}, ()),
}


def _table() -> dict[str, Sampler]:
    table = {}
    for name, (scheduler, options, schedules) in _BASE.items():
        table[name] = Sampler(name, scheduler, MappingProxyType(dict(options)))
        for schedule in schedules:
            full = f"{name} {schedule}"
            table[full] = Sampler(full, scheduler, MappingProxyType({**options, **_SCHEDULES[schedule]}))
    return table


SAMPLERS: Mapping[str, Sampler] = MappingProxyType(_table())
# "Euler" on a model trained by flow matching (SD3): its own scheduler, its config kept
FLOW_MATCH_EULER = Sampler("Euler", "FlowMatchEulerDiscreteScheduler", MappingProxyType({}))

# kohya's sd-scripts `--sample_sampler` / `--ss` names (train_util's scheduler choice) -> the same sampler here;
# `dpmsingle` has no A1111 name (A1111's "DPM++ 2S a" is ancestral, which diffusers has not): its class name
KOHYA_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "ddim": "DDIM",
        "ddpm": "DDPM",
        "pndm": "PLMS",
        "lms": "LMS",
        "k_lms": "LMS",
        "euler": "Euler",
        "k_euler": "Euler",
        "euler_a": "Euler a",
        "k_euler_a": "Euler a",
        "dpmsolver++": "DPM++ 2M",
        "dpmsingle": "DPMSolverSinglestepScheduler",
        "heun": "Heun",
        "dpm_2": "DPM2",
        "k_dpm_2": "DPM2",
        "dpm_2_a": "DPM2 a",
        "k_dpm_2_a": "DPM2 a",
        "uni_pc": "UniPC",
        "lcm": "LCM",
    }
)


def _scheduler_classes() -> list[str]:
    import diffusers  # lazy: see Sampler.build

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n != "SchedulerMixin" and not n.startswith("Flow"))


def find_sampler(name: str) -> Sampler:
    """The sampler for an A1111 name (any case), a kohya name or a diffusers scheduler class name.

    An unknown name raises a one-line ValueError listing the A1111 names (the close ones first).
    """
    text = " ".join(name.split())
    if text in SAMPLERS:
        return SAMPLERS[text]
    by_lower = {key.lower(): sampler for key, sampler in SAMPLERS.items()}
    if text.lower() in by_lower:
        return by_lower[text.lower()]
    if text.lower() in KOHYA_NAMES:
        return find_sampler(KOHYA_NAMES[text.lower()])
    classes = _scheduler_classes()
    for class_name in (text, text + "Scheduler"):  # PNGs record a scheduler A1111 has no name for without `Scheduler`
        if class_name in classes:
            return Sampler(class_name, class_name, MappingProxyType({}))
    close = difflib.get_close_matches(text, list(SAMPLERS), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise UserError(
        f"unknown sampler {name!r}{hint}; known: {', '.join(SAMPLERS)}, kohya's names ({', '.join(KOHYA_NAMES)}) or a diffusers scheduler class name"
    )


def set_sampler(pipe, name: str) -> Sampler:
    """Give the pipeline the named sampler, built on its current scheduler's config; returns it."""
    sampler = find_sampler(name)
    if _flow_matching(pipe.scheduler):
        if sampler.name != "Euler":
            raise UserError(
                f"this model samples by flow matching ({type(pipe.scheduler).__name__}), which sampler {name!r} cannot: "
                "use 'Euler' or leave the sampler out"
            )
        sampler = FLOW_MATCH_EULER
    pipe.scheduler = sampler.build(pipe.scheduler.config)
    return sampler


def _flow_matching(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def sampler_name(scheduler) -> str:
    """A1111's name for a scheduler as configured (e.g. DPMSolverMultistepScheduler with Karras sigmas is
    "DPM++ 2M Karras"); the class name without `Scheduler` where A1111 has none."""
    class_name = type(scheduler).__name__
    if class_name == FLOW_MATCH_EULER.scheduler:
        return FLOW_MATCH_EULER.name
    config = scheduler.config
    for sampler in SAMPLERS.values():
        if sampler.scheduler == class_name and all(config.get(key, _default(key)) == value for key, value in sampler.options.items()):
            return sampler.name
    return class_name.removesuffix("Scheduler")


def _default(option: str) -> Any:
    """What a scheduler without the option in its config does: no sigma schedule, no skipped PRK steps."""
    return False if option.startswith("use_") or option == "skip_prk_steps" else None
