"""`sdlora generate` and the image side of the library: PNG parameters, seeds, grid, one-line errors."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlora import __version__
from sdlora.cli import main
from sdlora.core.files import lora_file_hash, write_kohya
from sdlora.core.state import LoraModule
from sdlora.errors import UserError
from sdlora.inference.adapters import LoadedLora, load_lora
from sdlora.inference.generation import a1111_parameters, generate, image_grid, read_parameters, resolve_device, save_images


@pytest.fixture
def kohya_file(tmp_path, tiny_pipe, random_lora_state):
    return write_kohya(random_lora_state(tiny_pipe, rank=4, alpha=8.0), tmp_path / "style.safetensors")


def test_cli_writes_pngs_with_parameters_and_a_grid(tmp_path, kohya_file, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "2", "--num-images", "2", "--seed", "41",
                 "--negative-prompt", "blurry", "--out", str(out), "--lora", f"{kohya_file}:0.5"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["00000-41.png", "00001-42.png", "grid.png"]
    parameters = read_parameters(out / "00001-42.png")
    prompt_line, negative_line, settings = parameters.split("\n")
    assert prompt_line == "a cat <lora:style:0.5>"
    assert negative_line == "Negative prompt: blurry"
    assert settings.startswith("Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny, ")
    assert f'Lora hashes: "style: {lora_file_hash(kohya_file)}"' in settings
    assert "Seed: 41" in read_parameters(out / "00000-41.png")
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (128, 64)  # two 64 px images side by side
    with Image.open(out / "00000-41.png") as image:
        assert image.size == (64, 64)
        assert image.text["parameters"].startswith("a cat <lora:style:0.5>")


def test_same_seed_same_images_and_each_image_redoable_alone(tiny_pipe):
    first = generate(tiny_pipe, "a cat", steps=2, seed=7, num_images=2, progress=False)
    again = generate(tiny_pipe, "a cat", steps=2, seed=7, num_images=2, progress=False)
    alone = generate(tiny_pipe, "a cat", steps=2, seed=8, num_images=1, progress=False)
    assert [np.asarray(a).tolist() for a in first] == [np.asarray(b).tolist() for b in again]
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    # image 1 of the batch used seed 7 + 1; batched convolutions may differ by a rounding step
    assert np.abs(np.asarray(first[1], dtype=np.int16) - np.asarray(alone[0], dtype=np.int16)).max() <= 2
    assert [image.info["seed"] for image in first] == [7, 8]


def test_lora_scale_zero_generates_the_base_image(tiny_pipe, kohya_file):
    base = generate(tiny_pipe, "a cat", steps=2, seed=3, progress=False)[0]
    load_lora(tiny_pipe, kohya_file, scale=0.0)
    with_lora = generate(tiny_pipe, "a cat", steps=2, seed=3, progress=False)[0]
    assert np.array_equal(np.asarray(base), np.asarray(with_lora))
    assert "<lora:style:0>" in with_lora.info["parameters"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--height", "30"], "--height must be a positive multiple of 8, got 30"),
        (["--width", "100000"], "--width 100000 is larger than 8192: images that size would not fit in memory"),
        (["--guidance", "inf"], "--guidance inf: the guidance scale must be a number from 0 to 100 (7.5 is usual)"),
        (["--lora", "missing.safetensors:0.7"], "LoRA file not found: missing.safetensors"),
        (["--device", "gpu"], "--device gpu: not a device; use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_cli_user_errors_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--prompt", "a cat", "--steps", "2", "--out", "out", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"sdlora generate: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_device_this_machine_lacks_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="--device cuda:1: this machine has no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match="--device mps: this machine has no MPS"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(UserError, match=r"--device cuda:1: there is no such GPU here \(1 found"):
        resolve_device("cuda:1")


def test_cli_sdxl_lora_is_refused_before_generating(tmp_path, tiny_pipe, capsys, random_lora_state):
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, text_encoder=False)
    for module in state.modules.values():  # widen every input: SDXL-sized features
        module.down = module.down.new_ones(module.rank, 2048)
    path = write_kohya(state, tmp_path / "xl.safetensors")
    code = main(["generate", "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "out"), "--lora", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "made for SDXL" in err
    assert not (tmp_path / "out").exists()


def test_a1111_parameters_layout():
    loras = [LoadedLora("ink", 0.7, "0123456789ab", 10), LoadedLora("paper", 1.0, None, 4)]
    text = a1111_parameters(
        "a cat", "", steps=20, sampler="Euler a", guidance=7.0, seed=123, width=512, height=768, model="C:/models/sd15", loras=loras
    )
    assert text.split("\n") == [
        "a cat <lora:ink:0.7> <lora:paper:1>",
        f'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x768, Model: "C:/models/sd15", Lora hashes: "ink: 0123456789ab", Version: sdlora {__version__}',
    ]


def test_lora_file_hash_ignores_the_header(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(8.0).reshape(2, 4)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"ss_comment": "one"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"ss_comment": "another, longer comment"})
    data = (tmp_path / "a.safetensors").read_bytes()
    tensor_bytes = data[8 + struct.unpack("<Q", data[:8])[0] :]
    assert lora_file_hash(tmp_path / "a.safetensors") == hashlib.sha256(tensor_bytes).hexdigest()[:12]
    assert lora_file_hash(tmp_path / "b.safetensors") == lora_file_hash(tmp_path / "a.safetensors")


def test_save_images_numbers_on_and_grid_is_near_square(tmp_path):
    images = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(5)]
    for seed, image in enumerate(images):
        image.info.update(seed=seed, parameters=f"p{seed}")
    save_images(images[:2], tmp_path)
    paths = save_images(images[2:], tmp_path)
    assert [p.name for p in paths] == ["00002-2.png", "00003-3.png", "00004-4.png", "grid.png"]
    assert read_parameters(tmp_path / "00003-3.png") == "p3"
    assert image_grid(images).size == (24, 16)  # 3 columns, 2 rows
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sdlora-tmp")]


def test_cli_partial_match_is_a_one_line_warning(tmp_path, tiny_pipe, capsys, random_lora_state):
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, text_encoder=False)
    matching = len(state)
    state.modules["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"] = LoraModule(torch.ones(4, 32), torch.ones(32, 4), 8.0)
    path = write_kohya(state, tmp_path / "half.safetensors")  # also a torch Module method name
    code = main(["generate", "--prompt", "a cat", "--steps", "1", "--seed", "0", "--out", str(tmp_path / "out"), "--lora", str(path)])
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert code == 0
    assert warning_lines == [
        f"sdlora generate: warning: {path}: only {matching} of its {matching + 1} modules match this model; 1 are skipped (e.g. unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q)"
    ]
    assert "<lora:half_lora:1>" in read_parameters(tmp_path / "out" / "00000-0.png")
