"""validation.py: fixed timesteps, and a held-out loss that is the same number each time it is measured."""

import torch
from test_train import make_dataset, tiny_config

import sdlora.trainer as trainer
from sdlora.validation import fixed_timesteps, validation_loss


def test_fixed_timesteps_cover_the_schedule_evenly():
    assert fixed_timesteps(1000, 8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert fixed_timesteps(1000, 1).tolist() == [500]


def test_validation_loss_is_repeatable_and_moves_with_the_weights(tmp_path, monkeypatch):
    runs = []
    original = trainer._setup
    monkeypatch.setattr(trainer, "_setup", lambda *a: runs.append(original(*a)) or runs[-1])
    data = make_dataset(tmp_path / "data", count=6)
    trainer.train(tiny_config(data, tmp_path / "run", steps=1, val_split=0.34, checkpoint_every=0))
    run = runs[-1]
    assert len(run.val_records) == 2
    first, again = validation_loss(run), validation_loss(run)
    assert first == again  # fixed latents, noise and timesteps
    with torch.no_grad():
        for parameter in run.trainable.values():
            parameter.add_(0.05)
    assert validation_loss(run) != first


def _trained_run(tmp_path, monkeypatch, **options):
    runs = []
    original = trainer._setup
    monkeypatch.setattr(trainer, "_setup", lambda *a: runs.append(original(*a)) or runs[-1])
    data = make_dataset(tmp_path / "data", count=6)
    trainer.train(tiny_config(data, tmp_path / "run", steps=1, val_split=0.34, checkpoint_every=0, **options))
    return runs[-1]


def test_held_out_images_are_encoded_once_per_run(tmp_path, monkeypatch):
    run = _trained_run(tmp_path, monkeypatch)
    first = validation_loss(run)  # the run validated at its end already: its inputs are held
    encodes = []
    original_encode = run.pipe.vae.encode
    monkeypatch.setattr(run.pipe.vae, "encode", lambda *a, **k: encodes.append(1) or original_encode(*a, **k))
    original_text = run.text_encoder.forward
    monkeypatch.setattr(run.text_encoder, "forward", lambda *a, **k: encodes.append(2) or original_text(*a, **k))
    assert validation_loss(run) == first
    assert encodes == []  # neither the VAE nor the frozen text encoder ran again


def test_held_out_captions_are_encoded_afresh_while_the_text_encoder_trains(tmp_path, monkeypatch):
    run = _trained_run(tmp_path, monkeypatch, train_text_encoder=True)
    first = validation_loss(run)
    assert all(held.embeddings is None for held in run.held_out)
    with torch.no_grad():
        for name, parameter in run.trainable.items():
            if name.startswith("text_encoder.") and "lora_B" in name:
                parameter.add_(0.05)
    assert validation_loss(run) != first  # only the text encoder's LoRA moved, and the loss saw it
