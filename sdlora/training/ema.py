"""An exponential moving average of the LoRA weights (`--ema-decay`), kept beside them and saved as its own files.

The decay warms up as diffusers' `EMAModel` does by default: at optimizer step t it is min(decay, (1 + t) / (10 + t)),
so the average does not stay near the zero-initialised LoRA for the first 1 / (1 - decay) steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

STATE_FILE = "ema.safetensors"  # in a checkpoint: the averaged tensors by trainable name


class LoraEma:
    """fp32 shadows of the trainable LoRA tensors, on their device (no host copy per step), updated after each
    optimizer step."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: param.detach().to(torch.float32, copy=True) for name, param in trainable.items()}

    def decay_at(self, step: int) -> float:
        """The decay used at optimizer step `step` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, trainable: dict[str, torch.nn.Parameter], step: int) -> None:
        decay = self.decay_at(step)
        for name, param in trainable.items():
            self.shadow[name].lerp_(param.detach().to(torch.float32), 1.0 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, trainable: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """The averaged weights in the trainable tensors for the duration, the trained ones restored after."""
        kept = {name: param.detach().clone() for name, param in trainable.items()}
        try:
            for name, param in trainable.items():
                param.copy_(self.shadow[name].to(param.device, param.dtype))
            yield
        finally:
            for name, param in trainable.items():
                param.copy_(kept[name])

    def save(self, path: Path) -> None:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        """The shadows of a checkpoint; a checkpoint without them (saved before --ema-decay was set) is an error."""
        if not Path(path).is_file():
            raise UserError(f"{Path(path).parent} has no EMA weights ({STATE_FILE}): resume it without --ema-decay, or start afresh")
        saved = load_file(str(path))
        if set(saved) != set(self.shadow) or any(saved[n].shape != self.shadow[n].shape for n in saved):
            raise UserError(f"{path} does not match the LoRA being trained (other rank or layers?)")
        self.shadow = {name: saved[name].to(self.shadow[name].device, torch.float32) for name in self.shadow}
