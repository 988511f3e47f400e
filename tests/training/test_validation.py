"""validation.py: fixed timesteps, and a held-out loss that is the same number each time it is measured."""

import pytest
import torch

from sdlora.training import recipe
from sdlora.training.validation import fixed_timesteps


def test_fixed_timesteps_cover_the_schedule_evenly():
    assert fixed_timesteps(1000, 8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert fixed_timesteps(1000, 1).tolist() == [500]


@pytest.fixture
def trained_run(tmp_path, make_dataset, tiny_config):
    """`trained_run(**options)`: a Run after one step with a third of six images held out, through the public phases."""

    def run_with(**options) -> recipe.Run:
        data = make_dataset(tmp_path / "data", count=6)
        run = recipe.setup(tiny_config(data, tmp_path / "run", steps=1, val_split=0.34, checkpoint_every=0, **options))
        recipe.run_steps(run)
        recipe.save_outputs(run)
        return run

    return run_with


def test_validation_loss_is_repeatable_and_moves_with_the_weights(trained_run):
    run = trained_run()
    assert len(run.validator.records) == 2
    first, again = run.validator.loss(), run.validator.loss()
    assert first == again  # fixed latents, noise and timesteps
    with torch.no_grad():
        for parameter in run.trainable.values():
            parameter.add_(0.05)
    assert run.validator.loss() != first


def test_held_out_images_are_encoded_once_per_run(trained_run, monkeypatch):
    run = trained_run()
    first = run.validator.loss()  # the run validated at its end already: its inputs are held
    encodes = []
    original_encode = run.model.pipe.vae.encode
    monkeypatch.setattr(run.model.pipe.vae, "encode", lambda *a, **k: encodes.append(1) or original_encode(*a, **k))
    text_encoder = run.model.text_encoders["text_encoder"]
    original_text = text_encoder.forward
    monkeypatch.setattr(text_encoder, "forward", lambda *a, **k: encodes.append(2) or original_text(*a, **k))
    assert run.validator.loss() == first
    assert encodes == []  # neither the VAE nor the frozen text encoder ran again


def test_held_out_captions_are_encoded_afresh_while_the_text_encoder_trains(trained_run):
    run = trained_run(train_text_encoder=True)
    first = run.validator.loss()
    assert all(held.embeddings is None for held in run.validator.held_out)
    with torch.no_grad():
        for name, parameter in run.trainable.items():
            if name.startswith("text_encoder.") and "lora_B" in name:
                parameter.add_(0.05)
    assert run.validator.loss() != first  # only the text encoder's LoRA moved, and the loss saw it


def test_a_sample_that_comes_out_nan_is_a_warning_and_a_black_cell_not_the_end_of_the_run(tmp_path, make_dataset, tiny_config, monkeypatch):
    from PIL import Image

    from sdlora.inference.generation import NonFiniteImageError
    from sdlora.training import validation

    prompts = tmp_path / "samples.txt"
    prompts.write_text("a red circle --w 64 --h 48\na blue square\n")
    calls = []

    def overflowing(pipe, prompt, *args, **kwargs):
        calls.append(prompt)
        raise NonFiniteImageError("the image of seed 1 came out NaN or inf, so it was not saved")

    monkeypatch.setattr(validation, "generate", overflowing)
    data = make_dataset(tmp_path / "data", count=2)
    with pytest.warns(UserWarning, match="sample prompt 1 at step 1: the image of seed 1 came out NaN"):
        recipe.train(tiny_config(data, tmp_path / "run", steps=1, checkpoint_every=0, sample_prompts=str(prompts)))
    assert calls == ["a red circle", "a blue square"] and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    samples = sorted((tmp_path / "run" / "samples").glob("step-*"))
    assert [p.name for p in samples] == ["step-00000001.png"]  # the grid only: no PNG of a NaN image
    with Image.open(samples[0]) as grid:
        assert grid.getbbox() is None  # both cells black
