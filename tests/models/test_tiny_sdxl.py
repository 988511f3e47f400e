"""The tiny SDXL model: deterministic, asymmetric text encoders, saved and reloaded as a folder, from the CLI."""

from __future__ import annotations

import json

import numpy as np
import torch

from sdlora.cli import main
from sdlora.core.families import SDXL, family_of_folder, family_of_pipeline
from sdlora.models.loading import load_pipeline
from sdlora.models.tiny import build_tiny_sdxl_pipeline


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def test_builds_the_same_weights_from_the_same_seed_with_encoders_of_different_widths():
    first, again, other = build_tiny_sdxl_pipeline(), build_tiny_sdxl_pipeline(), build_tiny_sdxl_pipeline(seed=1)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = _state(getattr(first, component)), _state(getattr(again, component))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    assert not torch.equal(_state(first.unet)["conv_in.weight"], _state(other.unet)["conv_in.weight"])
    assert (first.text_encoder.config.hidden_size, first.text_encoder_2.config.hidden_size, first.text_encoder_2.config.projection_dim) == (
        32,
        48,
        48,
    )
    assert type(first.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    config = first.unet.config
    assert (config.cross_attention_dim, config.addition_embed_type) == (80, "text_time")
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + 48  # time ids + pooled TE2
    assert type(first.scheduler).__name__ == "EulerDiscreteScheduler" and first.watermark is None
    assert family_of_pipeline(first) is SDXL


def _image(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(1)
    return pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images[0]


def test_saved_folder_reloads_as_the_same_sdxl_pipeline(tiny_sdxl_dir):
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index and "tokenizer_2" in index
    assert family_of_folder(tiny_sdxl_dir) is SDXL
    loaded = load_pipeline(str(tiny_sdxl_dir))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    built = load_pipeline("tiny-sdxl")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = _state(getattr(loaded, component)), _state(getattr(built, component))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    # the same weights; the images agree to float noise (CPU kernels may pick another summation order, ~2e-6 seen)
    np.testing.assert_allclose(_image(loaded), _image(built), rtol=0, atol=1e-5)


def test_cli_writes_the_sdxl_variant(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "xl"), "--variant", "sdxl"]) == 0
    assert "wrote sdxl pipeline" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "xl").iterdir()} >= {
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    }
    assert json.loads((tmp_path / "xl" / "unet" / "config.json").read_text())["addition_embed_type"] == "text_time"
