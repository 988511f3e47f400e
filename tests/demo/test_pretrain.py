"""The demo model's pretraining script: deterministic, resumable, refusing to mix settings, writing a loadable pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdlora.demo import pretrain as pretrain_module
from sdlora.demo.pretrain import Schedule, pretrain
from sdlora.models.loading import load_pipeline

SMALL = Schedule(
    neutral_images=24, other_images=8, vae_steps=4, vae_batch=4, unet_steps=4, unet_batch=4, warmup=2, checkpoint_every=2, workers=1
)
PARTS = ("unet", "vae", "text_encoder")


def _weights(folder):
    return {part: load_file(str(next((folder / part).glob("*.safetensors")))) for part in PARTS}


def _same(first, second):
    for part in PARTS:
        assert first[part].keys() == second[part].keys()
        for key, tensor in first[part].items():
            assert torch.equal(tensor, second[part][key]), f"{part}.{key}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_two_runs_give_the_same_bits_and_a_run_killed_after_a_checkpoint_resumes_to_them(tmp_path, monkeypatch, stage):
    straight = _weights(pretrain(tmp_path / "a", seed=1, schedule=SMALL))
    if stage == "vae":
        _same(straight, _weights(pretrain(tmp_path / "b", seed=1, schedule=SMALL)))
    save = pretrain_module._save_checkpoint

    def save_then_die(path, state):  # the process killed right after the stage's step-2 checkpoint
        save(path, state)
        if path.name == f"{stage}.ckpt" and state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "c", seed=1, schedule=SMALL)
    assert not (tmp_path / "c" / "pipeline").exists()
    monkeypatch.setattr(pretrain_module, "_save_checkpoint", save)
    _same(straight, _weights(pretrain(tmp_path / "c", seed=1, schedule=SMALL)))
    if stage == "vae":
        return
    other_seed = _weights(pretrain(tmp_path / "d", seed=2, schedule=SMALL))
    assert not torch.equal(other_seed["unet"]["conv_in.weight"], straight["unet"]["conv_in.weight"])


@pytest.mark.slow
def test_the_pipeline_is_half_precision_loads_and_keeps_its_latent_scale(tmp_path):
    folder = pretrain(tmp_path / "run", seed=0, schedule=SMALL)
    assert all(t.dtype == torch.float16 for w in _weights(folder).values() for t in w.values())
    pipe = load_pipeline(str(folder))
    scaling = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    assert pipe.vae.config.scaling_factor == scaling and scaling != 0.18215
    assert pipe.unet.dtype == torch.float32  # loaded in fp32 for CPU work


def test_a_folder_holding_other_settings_is_refused_with_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "schedule.json").write_text(json.dumps({"seed": 9}))
    result = subprocess.run(
        [sys.executable, "-m", "sdlora.demo.pretrain", str(tmp_path / "run"), "--seed", "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "other settings" in result.stderr and "Traceback" not in result.stderr
