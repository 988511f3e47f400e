"""recipe.py end to end on the tiny model: outputs, loading, resume equivalence, divergence, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.core.families import SD1
from sdlora.training import recipe
from sdlora.training.recipe import TrainingDiverged, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@pytest.mark.slow  # over a second: subprocesses or several training runs
def test_cli_two_steps_writes_every_output(dataset, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdlora",
            "train",
            str(dataset),
            "--model",
            "tiny",
            "--output",
            str(out),
            "--steps",
            "2",
            "--resolution",
            "64",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--trigger",
            "sks",
            "--sample-steps",
            "2",
            "--val-split",
            "0.34",
            "--name",
            "style",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("pytorch_lora_weights.safetensors", "style.safetensors", "config.toml", "README.md", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "samples").glob("step-*.png"))
    assert list((out / "checkpoints").glob("step-*/COMPLETE"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in line for line in lines) and any("val_loss" in line for line in lines)
    with safe_open(str(out / "style.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8" and metadata["ss_max_train_steps"] == "2"
    assert "sks" in (out / "README.md").read_text()


def test_trained_lora_loads_in_diffusers_and_changes_output(dataset, tmp_path, tiny_config):
    from diffusers import StableDiffusionPipeline

    from sdlora.models.tiny import build_tiny_pipeline

    path = train(tiny_config(dataset, tmp_path / "run", steps=3, lr=1e-2))
    pipe = build_tiny_pipeline()

    def image():
        return pipe("sks, a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    base = image()
    pipe.load_lora_weights(str(path))
    assert sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A")) == 48  # 6 transformer blocks x 2 attentions x q,k,v,out
    assert abs(image() - base).max() > 1e-4
    assert isinstance(pipe, StableDiffusionPipeline)


def test_sample_at_first_draws_the_base_model_before_the_first_step(dataset, tmp_path, tiny_config):
    import numpy as np
    from PIL import Image

    grids = {}
    for seed in (1, 2):  # another seed: other LoRA weights, the same base (a fresh LoRA's B is zero)
        out = tmp_path / f"seed{seed}"
        train(tiny_config(dataset, out, steps=2, lr=1e-2, seed=seed, sample_at_first=True, checkpoint_every=0, sample_steps=2))
        grids[seed] = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in (out / "samples").glob("step-*.png")}
    assert sorted(grids[1]) == ["step-00000000.png", "step-00000002.png"]
    assert np.array_equal(grids[1]["step-00000000.png"], grids[2]["step-00000000.png"])
    assert np.abs(grids[1]["step-00000002.png"] - grids[2]["step-00000002.png"]).max() > 0
    train(tiny_config(dataset, tmp_path / "default", steps=1, checkpoint_every=0, sample_steps=1))
    assert [p.name for p in (tmp_path / "default" / "samples").glob("step-*.png")] == ["step-00000001.png"]


@pytest.mark.slow  # over a second: subprocesses or several training runs
def test_resume_gives_the_same_lora_bit_for_bit(dataset, tmp_path, tiny_config):
    straight = train(tiny_config(dataset, tmp_path / "straight", flip=True))
    first_half = tiny_config(dataset, tmp_path / "resumed", flip=True, steps=2)
    train(first_half)
    resumed = train(tiny_config(dataset, tmp_path / "resumed", flip=True, resume="latest"))
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_cached_and_uncached_runs_train_the_same_lora(dataset, tmp_path, tiny_config):
    cached = lora_tensors(train(tiny_config(dataset, tmp_path / "cached", cache="memory", steps=2)))
    uncached = lora_tensors(train(tiny_config(dataset, tmp_path / "uncached", cache="off", steps=2)))
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], rtol=1e-4, atol=1e-5)  # batched vs one-by-one encoding rounds differently


def test_nonfinite_loss_stops_with_a_clear_message(dataset, tmp_path, tiny_config):
    with pytest.raises(TrainingDiverged, match=r"step \d+.*lower --lr"):
        train(tiny_config(dataset, tmp_path / "run", lr=1e30, steps=6, max_grad_norm=0.0))


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_lora(dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "sdlora",
        "train",
        str(dataset),
        "--model",
        "tiny",
        "--output",
        str(out),
        "--steps",
        "3",
        "--resolution",
        "64",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--batch-size",
        "1",
        "--trigger",
        "sks",
        "--sample-steps",
        "1",
        "--checkpoint-every",
        "0",
        "--validate-every",
        "0",
        "--lr",
        "1e-3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["processes_in_sync"] for line in lines if "processes_in_sync" in line] == [2]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_text_encoder_lora_disk_cache_buckets_and_accumulation(dataset, tmp_path, monkeypatch, tiny_config):
    import sdlora.training.cache

    out = tmp_path / "run"
    config = tiny_config(
        dataset,
        out,
        steps=2,
        buckets=True,
        cache="disk",
        grad_accum=2,
        gradient_checkpointing=True,
        checkpoint_every=0,
        train_text_encoder=True,
        text_encoder_lr=5e-4,
    )
    run = recipe.setup(config)
    recipe.run_steps(run)
    path = recipe.save_outputs(run)
    state_keys = lora_tensors(path).keys()
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") for k in state_keys)
    # a trained text encoder rules out the embedding cache; latents still come from the disk cache
    assert run.encoder.embedding_cache is None and run.encoder.latent_cache is not None
    sizes = {size for size in run.buckets}
    assert any(w != h for w, h in sizes), sizes  # portrait and landscape images keep their aspect
    for (width, height), record in zip(run.buckets, run.records):
        assert (width > height) == (record.width > record.height) and (width < height) == (record.width < record.height)
    cache_files = list((out / "cache").glob("*.safetensors"))
    assert len(cache_files) == len(run.records)
    groups = {g["lr"] for g in run.optimizer.param_groups}
    assert groups == {1e-3, 5e-4}
    # a second run finds every latent on disk and encodes nothing
    monkeypatch.setattr(sdlora.training.cache, "encode_distribution", lambda *a: (_ for _ in ()).throw(AssertionError("encoded again")))
    train(tiny_config(dataset, tmp_path / "run", steps=1, buckets=True, cache="disk", checkpoint_every=0, sample_steps=1))


def test_model_card_code_runs_and_names_the_right_loader(dataset, tmp_path, tiny_config):
    """The card's Python block loads the base model and the LoRA as written (for `tiny`, through sdlora)."""
    import re

    from sdlora.training.outputs import _base_model_line, _pipeline_code

    out = tmp_path / "run"
    train(tiny_config(dataset, out, steps=1, checkpoint_every=0, validation_prompts=["sks, a red circle"]))
    card = (out / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert 'load_pipeline("tiny")' in code and "from_pretrained" not in code
    code = code.replace(".images[0]", "")  # keep the pipeline call, on the tiny model at 1 step
    code = code.replace('pipe("sks, a red circle")', 'pipe("sks, a red circle", num_inference_steps=1)')
    namespace: dict = {}
    exec(code, namespace)
    assert sum(1 for _, m in namespace["pipe"].unet.named_modules() if hasattr(m, "lora_A")) > 0
    assert "base_model:" not in card.split("---")[1]  # `tiny` is no hub id
    assert _base_model_line("stable-diffusion-v1-5/stable-diffusion-v1-5") == "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5\n"
    assert 'StableDiffusionPipeline.from_single_file("/models/v1-5.safetensors")' in _pipeline_code("/models/v1-5.safetensors", SD1)
    assert 'StableDiffusionPipeline.from_pretrained("/models/sd15")' in _pipeline_code("/models/sd15", SD1)
