"""Training on several processes for real: `torch.distributed.run --nproc-per-node 2` on the CPU (gloo), the tiny
models at 64 px. SDXL with both text encoders and gradient accumulation stays in sync and resumes bit for bit; a
disk cache is filled once for all processes; DeepSpeed and FSDP launches are refused before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora.core import targets
from sdlora.core.families import SDXL
from sdlora.errors import UserError
from sdlora.models.tiny import build_tiny_sdxl_pipeline
from sdlora.training import network, recipe
from sdlora.training.cache import LatentCache, fill_caches
from sdlora.training.datasets import load_training_data, record_buckets

# the CLI under torch.distributed.run, each process appending the batch size of each VAE encode to its own file
_COUNTING_LAUNCHER = """
import os, sys
import sdlora.training.cache as cache
from sdlora.cli import main

counts = os.path.join(sys.argv.pop(1), f"encodes-{os.environ['RANK']}.txt")
encode = cache.encode_distribution


def counted(vae, pixels, device):
    with open(counts, "a") as handle:
        handle.write(f"{pixels.shape[0]}\\n")
    return encode(vae, pixels, device)


cache.encode_distribution = counted
sys.exit(main(sys.argv[1:]))
"""


def _train_on_two_processes(tmp_path: Path, data: Path, out: Path, *options: str) -> dict[int, int]:
    """`sdlora train` on two processes; returns the images each process (by rank) put through the VAE."""
    launcher, counts = tmp_path / "launcher.py", tmp_path / f"encodes-{len(list(tmp_path.glob('encodes-*')))}"
    launcher.write_text(_COUNTING_LAUNCHER)
    counts.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher), str(counts)]
    command += ["train", str(data), "--output", str(out), "--resolution", "64", "--rank", "4", "--alpha", "8", "--batch-size", "1"]
    command += ["--trigger", "sks", "--sample-steps", "1", "--validate-every", "0", "--lr", "1e-3", "--seed", "3", *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    files = {rank: counts / f"encodes-{rank}.txt" for rank in (0, 1)}
    return {rank: sum(map(int, path.read_text().split())) if path.exists() else 0 for rank, path in files.items()}


def _processes_in_sync(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["processes_in_sync"] for row in rows if "processes_in_sync" in row]


@pytest.mark.slow  # three 2-process runs
def test_sdxl_with_both_text_encoders_trains_in_sync_and_resumes_bit_for_bit(dataset, tmp_path):
    # SDXL reads its first text encoder at the penultimate layer: a LoRA on its last layer would get no gradient and
    # DDP would stop at step 2; gradient accumulation skips the all-reduce on all but the last micro-batch
    sdxl = ("--model", "tiny-sdxl", "--train-text-encoder", "--text-encoder-lr", "5e-4", "--grad-accum", "2", "--checkpoint-every", "2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_on_two_processes(tmp_path, dataset, straight, *sdxl, "--steps", "4")
    assert _processes_in_sync(straight) == [2]  # every rank ended with the same weights (checked bit for bit)
    _train_on_two_processes(tmp_path, dataset, resumed, *sdxl, "--steps", "2")
    _train_on_two_processes(tmp_path, dataset, resumed, *sdxl, "--steps", "4", "--resume", "latest")
    assert _processes_in_sync(resumed) == [2, 2]  # at the end of the interrupted run, and of the resumed one
    for name in ("pytorch_lora_weights.safetensors", "lora.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    weights = load_file(straight / "pytorch_lora_weights.safetensors")
    trained_layers = {key.split(".self_attn")[0] for key in weights if key.startswith("text_encoder.")}
    assert "text_encoder.text_model.encoder.layers.3" in trained_layers and "text_encoder.text_model.encoder.layers.4" not in trained_layers
    assert any(key.startswith("text_encoder_2.text_model.encoder.layers.4.") for key in weights)  # its pooled output is read


@pytest.mark.slow  # a 2-process run
def test_disk_cache_encodes_each_image_once_across_processes(dataset, tmp_path):
    out = tmp_path / "run"
    encodes = _train_on_two_processes(
        tmp_path, dataset, out, "--model", "tiny", "--cache", "disk", "--steps", "1", "--checkpoint-every", "0"
    )
    entries = list((out / "cache").glob("*.safetensors"))
    images = len([p for p in dataset.iterdir() if p.suffix in (".png", ".jpg")])
    assert len(entries) == images
    assert sum(encodes.values()) == images and min(encodes.values()) > 0, encodes  # split between them, never repeated


def test_sdxl_text_encoder_lora_leaves_out_the_layers_the_unet_never_reads(tiny_sdxl_pipe):
    # the first encoder is read at its penultimate layer: LoRA on the last would get no gradient, which DDP refuses
    pipe = tiny_sdxl_pipe
    first, second = (targets.text_encoder_target_modules(getattr(pipe, s.component), spec=s) for s in SDXL.text_encoders)
    everything = targets.text_encoder_target_modules(pipe.text_encoder)
    assert sorted(set(everything) - set(first)) == [f"encoder.layers.4.self_attn.{p}" for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    assert second == targets.text_encoder_target_modules(pipe.text_encoder_2)  # its pooled output comes out of its last layer
    # a LoRA trained on every layer (an older sdlora) still goes on training: its unread modules changed nothing
    network.add_lora(pipe.unet, targets.unet_target_modules(pipe.unet, "attn"), 4, 8.0, init="default")
    network.add_lora(pipe.text_encoder, everything, 4, 8.0, init="default")
    old = network.extract_lora_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    fresh = build_tiny_sdxl_pipeline()
    network.add_lora(fresh.unet, targets.unet_target_modules(fresh.unet, "attn"), 4, 8.0)
    network.add_lora(fresh.text_encoder, first, 4, 8.0)
    models = {"unet": fresh.unet, "text_encoder": fresh.text_encoder}
    with pytest.raises(UserError, match="adapts 4 layers this run does not"):
        network.load_state_into(old, models)
    assert network.load_state_into(old, models, family=SDXL) == len(old) - 4
    loaded = network.extract_lora_state(models)
    assert all(torch.equal(module.down, old.modules[path].down) for path, module in loaded.modules.items())


def _fill_as_processes(records, buckets, cache_dir: Path | None, wait_for_everyone) -> tuple[list[tuple[int, Path]], list[LatentCache]]:
    """`fill_caches` run by two threads standing for processes 0 and 1; returns who encoded which image, and each
    one's cache."""
    encoded: list[tuple[int, Path]] = []

    def fill(process: int) -> LatentCache:
        def encode(pixels: torch.Tensor, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
            encoded.extend((process, path) for path in paths)
            return torch.full((len(paths), 4, 8, 8), float(process)), torch.ones(len(paths), 4, 8, 8)

        cache = LatentCache(encode, "test", cache_dir)
        fill_caches(records, buckets, cache, None, show=False, share=(process, 2), wait_for_everyone=wait_for_everyone)
        return cache

    with ThreadPoolExecutor(2) as pool:
        caches = list(pool.map(fill, (0, 1)))
    return encoded, caches


def test_a_disk_cache_is_filled_once_for_all_processes_a_memory_cache_by_each(dataset, tmp_path, tiny_config):
    config = tiny_config(dataset, tmp_path / "run", flip=True).replace(resolution=64, buckets=True)
    data = load_training_data(config.data, 3, str(tmp_path / "run"))
    records = data.records + data.records[:2]  # an image listed twice (two subsets) is still one entry
    buckets = record_buckets(data, config.data)
    buckets += buckets[:2]
    encoded, caches = _fill_as_processes(records, buckets, tmp_path / "cache", threading.Barrier(2).wait)
    images = sorted(record.path for record in data.records)
    assert sorted(path for _, path in encoded) == sorted(images * 2)  # each image once per flip, by one process
    assert sum(process == 0 for process, _ in encoded) == sum(process == 1 for process, _ in encoded) == len(images)
    assert caches[0].keys == caches[1].keys and len(caches[0].keys) == 2 * len(images)  # each reads the others' entries
    # in memory each process needs every entry and encodes it itself, without waiting for the others
    encoded, _ = _fill_as_processes(records, buckets, None, lambda: pytest.fail("waited"))
    assert sorted(encoded) == sorted((process, path) for process in (0, 1) for path in images * 2)


@pytest.mark.parametrize(("variable", "name"), [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_deepspeed_and_fsdp_launches_are_refused_before_the_model_loads(dataset, tmp_path, tiny_config, monkeypatch, variable, name):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch` sets from a DeepSpeed or FSDP config
    monkeypatch.setattr(recipe, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=f"^{name} is not supported: .*DDP.*accelerate launch --multi_gpu") as raised:
        recipe.train(tiny_config(dataset, out))
    assert "\n" not in str(raised.value) and not out.exists()
