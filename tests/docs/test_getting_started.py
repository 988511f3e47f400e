"""Every ```bash block of docs/getting-started.md runs as written, in a folder that looks like the repository root.

Two things a test cannot do are left out or stood in for: `pip install` lines are not run (they would change the
environment the tests run in; README.md's set-up line, which .ci/run follows, is checked to be the same), and the
section on a real SD1.5 model runs on the demo model, with a few captioned images as `my_images` and few steps
(the model to download is 4 GB, and 1000 steps at 512 px take a GPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "getting-started.md"
README = ROOT / "README.md"
REAL_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
USER_IMAGES = "my_images"
# appended to a command on the stand-in model (a later flag wins in argparse): a smoke run, not a training
STAND_IN_FLAGS = {
    "train": ["--steps", "2", "--validate-every", "0", "--sample-steps", "2"],
    "generate": ["--steps", "4"],
}


def _page_commands(bash_blocks, shell_commands) -> list[str]:
    return [command for _, block in bash_blocks(PAGE.read_text(encoding="utf-8")) for command in shell_commands(block)]


def _user_images(work: Path, count: int = 4) -> None:
    """A few of the example images with their captions, as a user's `my_images` folder."""
    folder = work / USER_IMAGES
    folder.mkdir()
    for image in sorted((ROOT / "datasets_examples" / "flat_poster").glob("*.png"))[:count]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)


def _stand_in(args: list[str]) -> list[str]:
    """The command on the demo model instead of the real one, with the smoke-run flags."""
    if REAL_MODEL not in args:
        return args
    return ["demo" if arg == REAL_MODEL else arg for arg in args] + STAND_IN_FLAGS.get(args[0], [])


def test_install_line_is_the_readmes(bash_blocks, shell_commands):
    """The page installs as README.md's first command does (which .ci/run and newcomers follow)."""
    (install,) = [command for command in _page_commands(bash_blocks, shell_commands) if command.startswith("pip install")]
    readme_first = shell_commands(bash_blocks(README.read_text(encoding="utf-8"))[0][1])[0]
    assert readme_first.split(" && ")[0] == install


@pytest.mark.slow
def test_every_command_runs(tmp_path, bash_blocks, shell_commands, sdlora_invocations, repo_workspace, run_sdlora, train_once):
    from PIL import Image

    work = repo_workspace(tmp_path)
    _user_images(work)
    printed: dict[str, str] = {}
    for command in _page_commands(bash_blocks, shell_commands):
        if command.startswith("pip install"):
            continue
        invocations = sdlora_invocations(command)
        assert len(invocations) == 1 and command.startswith("sdlora "), f"the test runs sdlora commands only: {command}"
        (args,) = invocations
        if args[0] == "train" and REAL_MODEL not in args:
            train_once(args, work)  # the README's main job trains the same LoRA
        else:
            printed[args[0]] = run_sdlora(_stand_in(args), work)

    out = work / "out"
    run = out / "flat_poster"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "flat_poster.safetensors").is_file()
    assert len(list((out / "images").glob("0000*-*.png"))) == 4 and (out / "images" / "grid.png").is_file()
    # the merged model draws what the model with the LoRA loaded draws (same seed, same weight)
    with_lora = np.asarray(Image.open(out / "images" / "00000-1.png"), dtype=np.int16)
    merged = np.asarray(Image.open(out / "images-merged" / "00000-1.png"), dtype=np.int16)
    assert np.abs(with_lora - merged).max() <= 1
    assert "kohya" in printed["inspect"]
    # the real-model section, on the stand-in
    assert (out / "mystyle" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((out / "mystyle-images").glob("0000*-*.png"))) == 4
