"""kohya sd-scripts' sample-prompt files (`--sample_prompts`): the prompts training draws its samples from.

A text file has one prompt per line (blank lines and lines starting with `#` skipped), each optionally followed
by options as sd-scripts' `line_to_prompt_dict` reads them, each introduced by ` --`:

    masterpiece, a red fox --n blurry, low quality --w 512 --h 768 --d 1234 --l 7.5 --s 28 --ss euler_a

`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` guidance scale, `--s` steps, `--ss` sampler (kohya's
names, A1111's or a diffusers class). A `.json` file holds a list of such lines or of objects with sd-scripts'
keys (`prompt`, `negative_prompt`, `width`, `height`, `seed`, `scale`, `sample_steps`, `sample_sampler`).
Where sd-scripts warns and goes on, an unknown option here is an error naming the line, before training starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..inference.generation import MAX_IMAGE_SIDE, check_guidance
from ..inference.samplers import find_sampler


@dataclass(frozen=True)
class SamplePrompt:
    """One sample: its prompt and whatever the line set (None: the run's default)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None


# option letter -> (field, parser); the letters and their meanings are sd-scripts'
_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int), "l": ("guidance", float),
            "s": ("steps", int), "ss": ("sampler", str)}  # fmt: skip
# sd-scripts' JSON keys -> ours
_JSON_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height", "seed": "seed",
              "scale": "guidance", "sample_steps": "steps", "sample_sampler": "sampler"}  # fmt: skip


_JSON_TYPES = {"width": (int,), "height": (int,), "seed": (int,), "steps": (int,), "guidance": (int, float)}


def parse_line(line: str, where: str = "line") -> SamplePrompt:
    """One prompt line with its ` --x value` options; a bad option raises a one-line ValueError naming `where`."""
    prompt, *options = (" " + line.strip()).split(" --")  # the space: a line that starts with an option has no prompt
    values: dict[str, object] = {}
    for option in options:
        if not option.strip():
            continue
        match = re.fullmatch(r"([A-Za-z]+)(?:\s+(.*))?", option.strip(), re.DOTALL)
        letter = match.group(1).lower() if match else option.split()[0]
        if letter not in _OPTIONS:
            known = ", ".join(f"--{k}" for k in _OPTIONS)
            raise UserError(f"{where}: unknown option --{letter} (the options are {known})")
        name, parse = _OPTIONS[letter]
        text = (match.group(2) or "").strip()
        if not text:
            raise UserError(f"{where}: --{letter} needs a value")
        try:
            values[name] = parse(text)
        except ValueError:
            raise UserError(f"{where}: --{letter} {text!r} is not {'an integer' if parse is int else 'a number'}") from None
    return _checked(SamplePrompt(prompt.strip(), **values), where)


def _checked(sample: SamplePrompt, where: str) -> SamplePrompt:
    if not sample.prompt:
        raise UserError(f"{where}: no prompt before the options")
    for name in ("width", "height"):
        value = getattr(sample, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{where}: --{name[0]} {value} must be a positive multiple of 8")
        if value is not None and value > MAX_IMAGE_SIDE:  # found now, not when the sample is drawn after training
            raise UserError(f"{where}: --{name[0]} {value} is larger than {MAX_IMAGE_SIDE}: a sample that size would not fit in memory")
    if sample.steps is not None and sample.steps < 1:
        raise UserError(f"{where}: --s {sample.steps} must be at least 1")
    if sample.seed is not None and not 0 <= sample.seed < 2**63:
        raise UserError(f"{where}: --d {sample.seed} must be between 0 and 2**63")
    if sample.guidance is not None:
        try:
            check_guidance(sample.guidance, "--l")
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
    if sample.sampler is not None:
        try:
            find_sampler(sample.sampler)
        except ValueError as err:
            raise UserError(f"{where}: --ss {str(err).split(';')[0]}") from None
    return sample


def read_sample_prompts(path: str | os.PathLike) -> list[SamplePrompt]:
    """The samples of a kohya sample-prompt file (text, or `.json`); an empty file or a bad line is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--sample-prompts {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        samples = _from_json(text, path)
    else:
        samples = [
            parse_line(line, f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not samples:
        raise UserError(f"--sample-prompts {path}: the file holds no prompts")
    return samples


def _from_json(text: str, path: Path) -> list[SamplePrompt]:
    try:
        items = json.loads(text)
    except ValueError as err:
        raise UserError(f"--sample-prompts {path}: not valid JSON ({err})") from None
    if not isinstance(items, list):
        raise UserError(f"--sample-prompts {path}: expected a JSON list of prompts")
    samples = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        if isinstance(item, str):
            samples.append(parse_line(item, where))
            continue
        if not isinstance(item, dict):
            raise UserError(f"{where}: each entry must be a prompt line or an object with a 'prompt'")
        unknown = sorted(set(item) - set(_JSON_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(_JSON_KEYS)})")
        if "prompt" not in item:
            raise UserError(f"{where}: the object has no 'prompt'; give each object its prompt text")
        for key, value in item.items():
            expected = _JSON_TYPES.get(_JSON_KEYS[key], (str,))
            if isinstance(value, bool) or not isinstance(value, expected):
                raise UserError(
                    f"{where}: {key} must be {'a number' if float in expected else 'an integer' if int in expected else 'a string'}, got {value!r}"
                )
        samples.append(_checked(SamplePrompt(**{_JSON_KEYS[k]: v for k, v in item.items()}), where))
    return samples
