"""datasets_examples/: the generator rebuilds the committed sets, each set is small and well formed, every train.toml trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.config import TrainConfig, load_toml
from sdlora.training import data

EXAMPLES = Path(__file__).resolve().parents[2] / "datasets_examples"
GENERATOR = EXAMPLES / "make_datasets.py"
TOMLS = sorted(EXAMPLES.glob("*/train.toml"))
DATASETS = [toml.parent for toml in TOMLS]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# one thread: the tiny model gains nothing from more, and on a busy 2-core runner two threads per process made a
# 2-step run 5x slower (54 s against 11 s, measured with other jobs running)
TRAIN_ENV = {**ENV, "OMP_NUM_THREADS": "1"}
MAX_BYTES = 3 * 2**20


def _ids(path: Path) -> str:
    return path.parent.name if path.name == "train.toml" else path.name


def _generated(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".txt"))


def test_at_least_two_datasets_each_with_a_train_toml():
    assert len(TOMLS) >= 2, TOMLS
    assert {folder.name for folder in DATASETS} >= {"flat_poster", "ink_hatch"}


@pytest.mark.parametrize("folder", DATASETS, ids=_ids)
def test_dataset_is_small_with_every_shape_and_a_trigger_caption_per_image(folder):
    config = load_toml(folder / "train.toml")
    trigger = config["trigger"]
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size < MAX_BYTES, f"{folder.name} is {size / 2**20:.2f} MiB"
    images = sorted(folder.glob("*.png"))
    assert 20 <= len(images) <= 40
    shapes = set()
    for image_path in images:
        with Image.open(image_path) as image:
            width, height = image.size
        assert max(width, height) <= 512, image_path.name
        shapes.add("square" if width == height else "portrait" if height > width else "landscape")
        caption = image_path.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption.startswith(f"{trigger}, ") and caption.endswith("\n") and len(caption.split()) >= 8, image_path.name
    assert shapes == {"square", "portrait", "landscape"}
    # nothing else in the folder: every .txt belongs to an image
    assert {p.stem for p in folder.glob("*.txt")} == {p.stem for p in images}


@pytest.mark.parametrize("toml", TOMLS, ids=_ids)
def test_train_toml_loads_validates_and_finds_its_images(toml, tmp_path):
    options = load_toml(toml)
    # data_dir is resolved against the TOML's folder, so the config trains from any working directory
    assert Path(options["data_dir"]) == toml.parent.resolve()
    assert "output_dir" not in options, "leave the output to --output: a folder inside the dataset is refused"
    config = TrainConfig.from_options(**options, output_dir=str(tmp_path / "out"))
    assert (
        config.base.model == "demo" and config.data.resolution == 64 and config.data.buckets and config.network.rank != config.network.alpha
    )
    assert (
        config.data.val_split > 0
        and config.samples.validation_prompts
        and all(p.startswith(config.data.trigger) for p in config.samples.validation_prompts)
    )
    records = data.find_images(config.data.data_dir, trigger=config.data.trigger)
    train_records, held_out = data.split_validation(records, config.data.val_split, config.run.seed)
    assert len(held_out) >= 3 and len(train_records) >= 20
    assert all(
        record.caption.startswith(config.data.trigger + ", ") and record.caption.count(config.data.trigger) == 1 for record in records
    )


def _rebuild(out: Path, hash_seed: str) -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)], capture_output=True, text=True, env={**ENV, "PYTHONHASHSEED": hash_seed}
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_generator_rebuilds_the_committed_files_and_is_byte_deterministic(tmp_path):
    _rebuild(tmp_path / "a", "1")
    _rebuild(tmp_path / "b", "2")
    for folder in DATASETS:
        committed, rebuilt, again = _generated(folder), _generated(tmp_path / "a" / folder.name), _generated(tmp_path / "b" / folder.name)
        assert [p.name for p in rebuilt] == [p.name for p in committed] == [p.name for p in again]
        for old, new, new_again in zip(committed, rebuilt, again):
            # two runs here give the same bytes; against git compare pixels: another zlib encodes them to other bytes
            assert new.read_bytes() == new_again.read_bytes(), new.name
            if old.suffix == ".txt":
                assert new.read_bytes() == old.read_bytes(), old.name
            else:
                with Image.open(old) as before, Image.open(new) as after:
                    assert before.size == after.size and np.array_equal(
                        np.asarray(before.convert("RGB")), np.asarray(after.convert("RGB"))
                    ), old.name


@pytest.mark.slow  # over a second: subprocesses or several training runs
def test_generator_check_flags_only_an_edited_caption(tmp_path):
    copy = tmp_path / "copy"
    for folder in DATASETS:
        shutil.copytree(folder, copy / folder.name)
    edited = sorted((copy / DATASETS[0].name).glob("*.txt"))[0]
    edited.write_text("something else\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(GENERATOR), "--check", "--out", str(copy)], capture_output=True, text=True, env=ENV)
    # one line, naming the edited file: every other committed file matches a fresh build
    assert result.returncode == 1 and result.stdout.splitlines() == [f"{edited}: differs"], result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("toml", TOMLS, ids=_ids)
def test_train_toml_trains_two_steps_through_the_cli(toml, tmp_path):
    # run from an unrelated folder: the config's data_dir must not depend on the working directory
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdlora",
            "train",
            "--config",
            str(toml),
            "--output",
            "out",
            "--steps",
            "2",
            "--validate-every",
            "0",
            "--checkpoint-every",
            "0",
            "--sample-steps",
            "1",
        ],
        capture_output=True,
        text=True,
        env=TRAIN_ENV,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    name = load_toml(toml)["name"]
    for produced in ("pytorch_lora_weights.safetensors", f"{name}.safetensors", "config.toml", "README.md", "metrics.jsonl"):
        assert (out / produced).is_file(), produced
    assert list((out / "samples").glob("step-*.png"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 2]
    assert "steps = 2" in (out / "config.toml").read_text()
