"""Shared tiny fixtures: the tiny pipeline (in memory and as a folder) and small random LoRAs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from sdlora.models import write_tiny_model
from sdlora.state import LoraModule, LoraState
from sdlora.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny pipeline folder (read-only for tests: copy it before changing it)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def tiny_pipe():
    """A fresh in-memory tiny pipeline (fp32, random weights from seed 0)."""
    return build_tiny_pipeline()


def random_lora_state(
    pipe,
    rank: int = 4,
    alpha: float = 8.0,
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_encoder: bool = True,
    seed: int = 1,
    std: float = 0.1,
) -> LoraState:
    """A LoRA with non-zero up and down on every matching module of `pipe` (alpha != rank by default)."""
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}

    def add(path: str, layer) -> None:
        if isinstance(layer, torch.nn.Linear):
            down = torch.randn(rank, layer.in_features, generator=generator) * std
            up = torch.randn(layer.out_features, rank, generator=generator) * std
        else:
            kh, kw = layer.kernel_size
            down = torch.randn(rank, layer.in_channels, kh, kw, generator=generator) * std
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator) * std
        modules[path] = LoraModule(down, up, alpha)

    for name, layer in pipe.unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in unet_targets) and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            add("unet." + name, layer)
    if text_encoder:
        for name, layer in pipe.text_encoder.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                # files always spell the text encoder with `text_model.`; transformers 5 dropped it from the tree
                path = name if name.startswith("text_model.") else "text_model." + name
                add("text_encoder." + path, layer)
    return LoraState(modules)


@pytest.fixture
def lora_state(tiny_pipe):
    """A rank-4, alpha-8 LoRA on the tiny UNet's attention projections and the text encoder's."""
    return random_lora_state(tiny_pipe)
