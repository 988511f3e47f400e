"""--init-lora: training starts from an existing LoRA file (any format) with its exact update, and goes on from it."""

from __future__ import annotations

import pytest
import torch

from sdlora.core.files import read_lora
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training import network, recipe


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, make_dataset, tiny_config):
    """A LoRA trained for 3 steps at rank 4, alpha 8, UNet and text encoder: the file to train further."""
    root = tmp_path_factory.mktemp("init")
    data = make_dataset(root / "data", count=4)
    written = recipe.train(tiny_config(data, root / "first", steps=3, train_text_encoder=True, checkpoint_every=0))
    return data, written.parent


def _deltas(state) -> dict[str, torch.Tensor]:
    return {path: module.delta() for path, module in state.modules.items()}


@pytest.mark.parametrize("file_name", ["pytorch_lora_weights.safetensors", "lora.safetensors"])  # diffusers, kohya
def test_training_starts_from_the_file_and_goes_on(first_run, tmp_path, monkeypatch, file_name, tiny_config):
    data, first = first_run
    source = first / file_name
    # alpha 2 where the file has 8: the file's update is kept exactly, its scale moved into `up`
    out = tmp_path / "second"
    run = recipe.setup(tiny_config(data, out, steps=2, alpha=2.0, train_text_encoder=True, init_lora=str(source), checkpoint_every=0))
    started = [recipe.lora_state(run)]
    recipe.run_steps(run)
    recipe.save_outputs(run)
    expected = _deltas(read_lora(source))
    at_start = _deltas(started[0])
    assert set(at_start) == set(expected) and len(expected) > 20
    for path in expected:
        torch.testing.assert_close(at_start[path], expected[path], rtol=1e-5, atol=1e-7, msg=path)
    assert all(module.alpha == 2.0 for module in started[0].modules.values())
    finished = _deltas(read_lora(out / file_name))
    moved = max((finished[p] - expected[p]).abs().max().item() for p in expected)
    assert moved > 1e-6  # trained further, not just copied


def test_a_fresh_lora_differs_from_the_file(first_run, tmp_path):
    """Without --init-lora the run starts from zero updates: the test above is not passing by accident."""
    _, first = first_run
    pipe = build_tiny_pipeline()
    network.add_lora(pipe.unet, network.unet_target_modules(pipe.unet, "attn"), 4, 8.0)
    fresh = network.extract_lora_state({"unet": pipe.unet})
    assert all(module.delta().abs().max() == 0 for module in fresh.modules.values())
    assert max(m.delta().abs().max().item() for m in read_lora(first / "lora.safetensors").modules.values()) > 1e-5


def test_layer_set_mismatches_say_what_to_change(first_run):
    _, first = first_run
    state = read_lora(first / "lora.safetensors")
    pipe = build_tiny_pipeline()
    network.add_lora(pipe.unet, network.unet_target_modules(pipe.unet, "attn"), 4, 8.0)
    with pytest.raises(ValueError, match="adapts 20 layers this run does not .*add --train-text-encoder"):
        network.load_state_into(state, {"unet": pipe.unet}, label="x.safetensors")
    unet_only = type(state)({p: m for p, m in state.modules.items() if p.startswith("unet.")})
    other = build_tiny_pipeline()
    network.add_lora(other.unet, network.unet_target_modules(other.unet, "attn-ff"), 4, 8.0)
    with pytest.raises(ValueError, match="lacks .* it was trained with --preset attn$"):
        network.load_state_into(unet_only, {"unet": other.unet}, label="x.safetensors")
    ranked = build_tiny_pipeline()
    network.add_lora(ranked.unet, network.unet_target_modules(ranked.unet, "attn"), 8, 8.0)
    with pytest.raises(ValueError, match="has rank 4 at unet.* this run rank 8: set --rank 4"):
        network.load_state_into(unet_only, {"unet": ranked.unet}, label="x.safetensors")
