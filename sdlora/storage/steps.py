"""The names of step folders: a training run's checkpoints are `checkpoints/step-00000500/`.

Training writes and reads them; `sdlora grid` finds them in step order. Kept here, below both, because inference
does not import training.
"""

from __future__ import annotations

import re

STEP_DIR = re.compile(r"step-(\d+)")


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint at `step`: `step-00000500`."""
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step a `step-N` folder name stands for, or None when `name` is not one."""
    match = STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None
