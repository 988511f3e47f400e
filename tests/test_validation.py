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
