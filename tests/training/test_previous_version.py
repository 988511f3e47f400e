"""Options in sections change nothing a user has: the example train.toml files, and a config.toml that the version
before the sections wrote (flat keys), train to LoRAs bit-identical to what that version trains from them.

The previous version is taken from git (`PREVIOUS`, the last commit with the flat TrainConfig) and run in a
subprocess on this machine, so both sides compute on the same CPU.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "301637c"  # the flat TrainConfig of 74 fields, before the option sections
# short runs of the examples as written (the demo model, 64 px): two steps, one checkpoint, samples only at the end
SHORT = ["--steps", "2", "--checkpoint-every", "0", "--validate-every", "0", "--no-sample-at-first", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def previous_version(tmp_path_factory) -> Path:
    """A folder holding the previous version's `sdlora` package (from git)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git history: the previous version is read from it")
    archive = subprocess.run(["git", "archive", PREVIOUS, "sdlora"], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {PREVIOUS} is not in this clone's history (a shallow clone?)")
    folder = tmp_path_factory.mktemp("previous")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # our own git archive; the "data" filter where this Python has it (3.11.4 and later), as newer Pythons want
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder


def _train(package_root: Path | None, args: list[str], cwd: Path) -> None:
    """`sdlora train ARGS` with the package from `package_root` (None: this checkout's)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(package_root or ROOT)}
    done = subprocess.run([sys.executable, "-m", "sdlora", "train", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    if package_root is not None:  # the subprocess really ran the other version
        probe = subprocess.run(
            [sys.executable, "-c", "import sdlora.training.config as c; print(c.__file__)"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        assert probe.stdout.strip().startswith(str(package_root)), probe.stdout


def _tensors(folder: Path, name: str) -> dict:
    return load_file(folder / f"{name}.safetensors") | {
        "diffusers." + k: v for k, v in load_file(folder / "pytorch_lora_weights.safetensors").items()
    }


def _assert_bit_identical(expected: Path, actual: Path, name: str) -> None:
    old, new = _tensors(expected, name), _tensors(actual, name)
    assert old.keys() == new.keys()
    different = [key for key in old if old[key].dtype != new[key].dtype or not torch.equal(old[key], new[key])]
    assert not different, f"{len(different)} of {len(old)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("example", ["flat_poster", "ink_hatch"])
def test_examples_train_bit_identical_to_the_previous_version(example, previous_version, tmp_path):
    toml = ROOT / "datasets_examples" / example / "train.toml"
    # the examples now say mixed_precision = "auto", which the previous version did not know; on a CPU it is "no"
    earlier = tmp_path / "train.toml"
    text = toml.read_text().replace('mixed_precision = "auto"', 'mixed_precision = "no"')
    earlier.write_text(text.replace('data_dir = "."', f"data_dir = {str(toml.parent)!r}"))
    assert 'mixed_precision = "no"' in earlier.read_text()
    _train(previous_version, ["--config", str(earlier), *SHORT, "--output", str(tmp_path / "previous")], tmp_path)
    _train(None, ["--config", str(toml), *SHORT, "--output", str(tmp_path / "now")], tmp_path)
    _assert_bit_identical(tmp_path / "previous", tmp_path / "now", example)
    if example != "flat_poster":
        return
    # the flat config.toml the previous version wrote repeats its run in this version (its output_dir replaced); the
    # sectioned one this version writes loads back to the same options (tests/training/test_config.py)
    written = (tmp_path / "previous" / "config.toml").read_text()
    assert "[data]" not in written and "rank = 4" in written
    _train(None, ["--config", str(tmp_path / "previous" / "config.toml"), "--output", str(tmp_path / "again")], tmp_path / "now")
    _assert_bit_identical(tmp_path / "previous", tmp_path / "again", example)
