"""The LoRAs page's image jobs: an X/Y comparison (weights x checkpoints x prompts, and the other axes of
`sdlora grid`) and a generate box taking an A1111 prompt with `<lora:name:weight>` tags (`sdlora generate`).

Each request is checked here as its command checks before the model loads (the same `GridSpec.check`,
`resolve_prompts` and `prompt_loras`, every path and every tag's file under the roots), then queued as that
command's subprocess: the image comes from the command's own code, and a slow grid neither blocks the server nor
dies with the page. The job writes into its own folder; the page shows its images when it is done."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..inference.generation import GRID_NAME, check_guidance, check_image_size
from ..inference.grid import GridSpec, find_checkpoints, resolve_prompts
from ..inference.prompts import prompt_loras
from ..inference.samplers import find_sampler
from ..models.loading import is_builtin_model
from .roots import Roots

MAX_CELLS = 400  # cells of one comparison: a bigger grid is a typo more often than a wish


def grid_command(body: Any, roots: Roots) -> list[str]:
    """`sdlora grid` arguments (without --out) for an X/Y comparison: {model, lora_steps: [PATH], weights: [W],
    prompts: [TEXT], seeds, steps, guidance (lists), samplers: [NAME], negative_prompt, lora_dir, x, y, width, height}."""
    body = _object(body)
    model = _model(body, roots)
    lora_dir = _folder(body, "lora_dir", roots)
    sources = [str(roots.resolve(path, "lora_steps")) for path in _list(body, "lora_steps", str, [])]
    samplers = _list(body, "samplers", str, [])
    spec = GridSpec(
        prompts=_list(body, "prompts", str, None),
        weights=_list(body, "weights", float, [1.0]),
        checkpoints=find_checkpoints(sources),
        seeds=_list(body, "seeds", int, [0]),
        samplers=samplers or [None],
        steps=_list(body, "steps", int, [20]),
        guidance=_list(body, "guidance", float, [7.5]),
        negative_prompt=_string(body, "negative_prompt"),
        height=_size(body, "height"),
        width=_size(body, "width"),
        lora_dir=lora_dir,
        x=_string(body, "x") or None,
        y=_string(body, "y") or None,
    )
    spec.check()
    for checkpoint in spec.checkpoints:  # a run folder's step-* files, each a real path under the roots
        roots.resolve(checkpoint.path, "lora_steps")
    for _, tags in resolve_prompts(spec).values():
        for path, _, _ in tags:
            roots.resolve(path, "lora_dir")
    cells = math.prod(len(values) for values in spec.values().values())
    if cells > MAX_CELLS:
        raise UserError(f"the comparison has {cells} cells: at most {MAX_CELLS}")
    args = ["grid", "--model", model]
    for prompt in spec.prompts:
        args += ["--prompt", prompt]
    if sources:
        args += ["--lora-steps", *sources]
    args += ["--weights", _joined(spec.weights), "--seed", _joined(spec.seeds), "--steps", _joined(spec.steps)]
    args += ["--guidance", _joined(spec.guidance)]
    if samplers:
        args += ["--sampler", ",".join(samplers)]
    return args + _common(spec.negative_prompt, lora_dir, spec.width, spec.height) + _axes(spec)


def generate_command(body: Any, roots: Roots) -> list[str]:
    """`sdlora generate` arguments (without --out) for the generate box: {model, prompt (with <lora:name:weight>
    tags), lora_dir, negative_prompt, steps, guidance, seed, sampler, width, height}."""
    body = _object(body)
    model = _model(body, roots)
    lora_dir = _folder(body, "lora_dir", roots)
    prompt = _string(body, "prompt")
    if not prompt.strip():
        raise UserError("prompt is required")
    _, tags = prompt_loras(prompt, lora_dir)
    for path, _, _ in tags:
        roots.resolve(path, "lora_dir")
    steps, guidance, seed = _number(body, "steps", int, 20), _number(body, "guidance", float, 7.5), _number(body, "seed", int, 0)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if not 0 <= seed < 2**63:
        raise UserError(f"seed must be between 0 and 2**63, got {seed}")
    check_guidance(guidance, "guidance")
    sampler = _string(body, "sampler")
    args = ["generate", "--model", model, "--prompt", prompt, "--steps", str(steps), "--guidance", repr(guidance), "--seed", str(seed)]
    if sampler:
        find_sampler(sampler)
        args += ["--sampler", sampler]
    return args + _common(_string(body, "negative_prompt"), lora_dir, _size(body, "width"), _size(body, "height"))


def _common(negative: str | None, lora_dir: str | None, width: int | None, height: int | None) -> list[str]:
    args = ["--negative-prompt", negative] if negative else []
    args += ["--lora-dir", lora_dir] if lora_dir else []
    args += ["--width", str(width)] if width else []
    return args + (["--height", str(height)] if height else [])


def _axes(spec: GridSpec) -> list[str]:
    return (["--x", spec.x] if spec.x else []) + (["--y", spec.y] if spec.y else [])


def _joined(values: list) -> str:
    return ",".join(repr(value) for value in values)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any], roots: Roots) -> str:
    model = _string(body, "model") or "tiny"
    if is_builtin_model(model) and not (roots.home / model).exists():
        return model
    real = roots.resolve(model, "model")
    if not real.exists():
        raise FileNotFoundError(f"model {model}: not found (under {roots.home})")
    return str(real)


def _folder(body: dict[str, Any], name: str, roots: Roots) -> str | None:
    value = _string(body, name)
    if not value:
        return None
    real = roots.resolve(value, name)
    if not real.is_dir():
        raise FileNotFoundError(f"{name} {value}: no such folder")
    return str(real)


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or "\x00" in value:
        raise UserError(f"{name} must be text")
    return value


def _number(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UserError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return kind(value)


def _size(body: dict[str, Any], name: str) -> int | None:
    value = _number(body, name, int, None)
    check_image_size(value, name)
    return value


def _list(body: dict[str, Any], name: str, kind: type, default: list | None) -> list:
    value = body.get(name)
    if value is None or value == []:
        if default is None:
            raise UserError(f"{name}: give at least one")
        return default
    if not isinstance(value, list):
        raise UserError(f"{name} must be a list")
    if kind is str:
        if not all(isinstance(item, str) and item.strip() for item in value):
            raise UserError(f"{name} must be a list of non-empty texts")
        return value
    return [_number({name: item}, name, kind, None) for item in value if item is not None]


def job_images(out: Path) -> list[str]:
    """The PNG files an image job wrote, the labelled grid first."""
    if not out.is_dir():
        return []
    names = sorted(path.name for path in out.glob("*.png"))
    return sorted(names, key=lambda name: name != GRID_NAME)
