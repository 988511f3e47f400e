"""Nothing of the user's is lost, through the real CLI in subprocesses: for every command that writes, an output
path equal to, holding, or inside one of its inputs, or a folder (or file) of the user's own, is refused in one line
with a non-zero exit, and every file under the user's folder keeps its bytes. Then what may be replaced is: an output
sdlora wrote before."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from sdlora.core.files import write_kohya
from sdlora.models.loading import write_tiny_model
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.storage.atomic import TMP_PREFIX
from sdlora.storage.output_rules import MARKER_FILE

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PARALLEL = 3
TRAIN_FAST = ["--resolution", "64", "--rank", "4", "--alpha", "8", "--steps", "1", "--sample-steps", "1", "--validate-every", "0",
              "--checkpoint-every", "0"]  # fmt: skip


def run(argv: list[str]) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "sdlora", *argv], capture_output=True, text=True, env=ENV, timeout=600)
    return result.returncode, result.stdout, result.stderr


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes, and every folder."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory, random_lora_state, make_dataset):
    """A user's home folder: their photos, a LoRA, a model (and a second one), images to train on, a thesis."""
    home = tmp_path_factory.mktemp("home")
    (home / "photos").mkdir()
    (home / "photos" / "wedding.txt").write_text("the day")
    Image.new("RGB", (8, 8), "red").save(home / "photos" / "grid.png")  # their own grid.png
    (home / "thesis").mkdir()
    (home / "thesis" / "thesis.tex").write_text("\\documentclass{article}")
    write_tiny_model(home / "model")
    write_tiny_model(home / "tuned", seed=1)
    write_kohya(random_lora_state(build_tiny_pipeline(), rank=4, alpha=8.0), home / "my_lora.safetensors")
    make_dataset(home / "data", count=2)
    return home


def cases(home: Path) -> dict[str, list[str]]:
    """Each refused case: its argv. Inputs: home/model, home/tuned, home/my_lora.safetensors, home/data."""
    model, lora, data = str(home / "model"), str(home / "my_lora.safetensors"), str(home / "data")
    commands = {
        "merge": lambda out: ["merge", "--model", model, "--lora", f"{lora}:0.5", "--out", out],
        "unmerge": lambda out: ["unmerge", "--model", model, "--lora", lora, "--out", out],
        "convert": lambda out: ["convert", lora, out, "--to", "kohya"],
        "resize": lambda out: ["resize", lora, "--rank", "2", "--out", out],
        "combine": lambda out: ["combine", lora, f"{lora}:0.5", "--out", out],
        "extract": lambda out: ["extract", "--base", model, "--tuned", str(home / "tuned"), "--rank", "2", "--out", out],
        "train": lambda out: ["train", data, "--model", model, "--output", out, *TRAIN_FAST],
        "generate": lambda out: ["generate", "--model", model, "--prompt", "a cat", "--steps", "1", "--out", out],
        "grid": lambda out: ["grid", "--model", model, "--prompt", "a cat", "--steps", "1", "--out", out],
        "tiny-model": lambda out: ["tiny-model", out],
    }
    file_outputs = ("convert", "resize", "combine", "extract")
    found = {}
    for command, argv in commands.items():
        if command in file_outputs:
            if command != "extract":  # extract reads models, not LoRAs
                found[f"{command}-out-is-the-input-lora"] = argv(lora)
            found[f"{command}-out-is-the-users-file"] = argv(str(home / "photos" / "wedding.txt"))
            found[f"{command}-out-is-a-folder"] = argv(str(home))
        elif command == "tiny-model":
            found["tiny-model-into-the-thesis-folder"] = argv(str(home / "thesis"))
            found["tiny-model-into-the-home-folder"] = argv(str(home))
        else:
            found[f"{command}-out-is-the-model"] = argv(model)
            found[f"{command}-out-inside-the-model"] = argv(str(home / "model" / "unet" / "out"))
            if command in ("generate", "grid"):
                found[f"{command}-out-holds-the-users-grid"] = argv(str(home / "photos"))  # images are added; grid.png is replaced
            else:
                found[f"{command}-out-holds-the-inputs"] = argv(str(home))
                found[f"{command}-out-is-a-folder-of-the-users"] = argv(str(home / "photos"))
    inside = str(home / "model" / "unet" / "lora.safetensors")
    found["convert-out-inside-the-model"] = ["convert", lora, inside, "--to", "kohya", "--rank", "2", "--model", model]
    found["extract-out-inside-the-model"] = commands["extract"](inside)
    found["extract-out-is-the-model"] = commands["extract"](model)
    found["merge-single-file-onto-the-users-file"] = [
        "merge", "--model", str(home / "model" / "unet" / "diffusion_pytorch_model.safetensors"), "--lora", lora,
        "--single-file", str(home / "photos" / "wedding.txt"),
    ]  # fmt: skip
    return found


@pytest.fixture(scope="module")
def refused(home):
    before = digest(home)
    argvs = cases(home)
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(argvs, pool.map(run, argvs.values())))
    return before, argvs, results


CASE_NAMES = [
    *[f"{c}-{k}" for c in ("convert", "resize", "combine") for k in ("out-is-the-input-lora", "out-is-the-users-file", "out-is-a-folder")],
    *[f"{c}-{k}" for c in ("convert", "extract") for k in ("out-inside-the-model",)],
    *[f"extract-{k}" for k in ("out-is-the-model", "out-is-the-users-file", "out-is-a-folder")],
    *[f"{c}-{k}" for c in ("merge", "unmerge", "train") for k in ("out-is-the-model", "out-inside-the-model", "out-holds-the-inputs", "out-is-a-folder-of-the-users")],
    *[f"{c}-{k}" for c in ("generate", "grid") for k in ("out-is-the-model", "out-inside-the-model", "out-holds-the-users-grid")],
    "tiny-model-into-the-thesis-folder", "tiny-model-into-the-home-folder", "merge-single-file-onto-the-users-file",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_an_output_that_would_cost_the_user_a_file_is_refused_in_one_line(home, refused, name):
    before, argvs, results = refused
    code, stdout, stderr = results[name]
    assert code == 2, f"{name}: exit {code}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdlora {argvs[name][0]}: error: "), stderr[-3000:]
    assert digest(home) == before, f"{name}: the user's folder changed"


@pytest.mark.slow
def test_what_sdlora_wrote_is_replaced_and_a_users_folder_only_gains_images(home, refused, tmp_path):
    before = digest(home)
    merged = tmp_path / "merged"
    lora = str(home / "my_lora.safetensors")
    for scale in ("0.5", "1"):  # the second merge replaces the first: sdlora wrote it
        code, _, stderr = run(["merge", "--model", str(home / "model"), "--lora", f"{lora}:{scale}", "--out", str(merged)])
        assert code == 0, stderr[-2000:]
    assert (merged / MARKER_FILE).is_file()
    resized = tmp_path / "small.safetensors"
    for rank in ("2", "1"):
        code, _, stderr = run(["resize", lora, "--rank", rank, "--out", str(resized)])
        assert code == 0, stderr[-2000:]
    # generate into a folder of the user's files without a grid.png: it adds its images and keeps every file
    (home / "thesis" / "figures").mkdir()
    (home / "thesis" / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4")
    kept = digest(home / "thesis")
    code, _, stderr = run(
        ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "1", "--seed", "3", "--out", str(home / "thesis")]
    )
    assert code == 0, stderr[-2000:]
    after = digest(home / "thesis")
    assert {name: after[name] for name in kept} == kept and set(after) - set(kept) == {"00000-3.png", "grid.png"}
    # a second run replaces its own grid.png
    code, _, stderr = run(
        ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "1", "--seed", "4", "--out", str(home / "thesis")]
    )
    assert code == 0, stderr[-2000:]
    for path in home.rglob("*"):  # nothing else changed, no temporaries left
        name = str(path.relative_to(home))
        assert name.startswith("thesis") or before.get(name) == (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir")
    assert not list(home.rglob(TMP_PREFIX + "*")) and not list(tmp_path.rglob(TMP_PREFIX + "*"))


@pytest.mark.slow
def test_training_again_into_its_own_run_folder_is_allowed_and_a_foreign_one_is_not(home, tmp_path):
    out = tmp_path / "run"
    argv = ["train", str(home / "data"), "--model", "tiny", "--output", str(out), *TRAIN_FAST]
    code, _, stderr = run(argv)
    assert code == 0, stderr[-2000:]
    assert (out / MARKER_FILE).is_file() and (out / "config.toml").is_file()
    code, _, stderr = run(argv)
    assert code == 0, stderr[-2000:]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "README.md").write_text("my notes")
    code, _, stderr = run([*argv[:5], str(foreign), *TRAIN_FAST])
    assert code == 2 and "holds other files" in stderr and str(foreign) in stderr, stderr[-2000:]
    assert [p.name for p in foreign.iterdir()] == ["README.md"] and (foreign / "README.md").read_text() == "my notes"
