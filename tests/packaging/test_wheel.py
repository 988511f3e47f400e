"""The wheel carries everything sdlora needs at run time, and the version has one source.

The wheel is built from a copy of the git-tracked files (so nothing is written into the checkout) and installed into
a fresh venv that sees no source tree: the dependencies come from this venv's site-packages through a .pth line,
which adds the folder without running its .pth files, so this venv's editable install of sdlora stays out of reach.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
# the README's main job trains 300 steps, with samples and validation loss at steps 0, 50, ... (about a minute on a free CPU, far more
# on CI's 2 cores); a run that loads the demo model and writes the LoRA files proves the wheel's contents just as well,
# and tests/cli/test_readme.py runs the job as written
FAST_RUN = ["--steps", "2", "--validate-every", "0", "--no-sample-at-first", "--sample-steps", "2", "--val-split", "0"]
VERSIONS = "import importlib.metadata, sdlora; print(sdlora.__file__, sdlora.__version__, importlib.metadata.version('sdlora'), sep='\\n')"
STYLE_MEASURE = """
import sys
import sdlora
from sdlora import generate, load_lora, load_pipeline
from sdlora.demo.style import load_classifier

pipe = load_pipeline("demo")
load_lora(pipe, sys.argv[1])
pictures = generate(pipe, "flatposter, a red house with a blue roof", steps=4, seed=1, progress=False)
classifier = load_classifier()
print(sdlora.__file__)
print(float(classifier.probabilities(pictures)[0, classifier.styles.index("flat_poster")]))
"""


def _run(args: list, cwd: Path, timeout: float = 300) -> str:
    """Run a command outside the checkout and return its stdout; a failure shows the end of its stderr."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tracked_files() -> list[str]:
    """The files a commit would hold, relative to the repository root: tracked, and new ones git does not ignore
    (in CI's checkout that is the tracked files; locally a module not yet added still reaches the wheel)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the wheel is built from the files `git ls-files` lists")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: the wheel is built from the files `git ls-files` lists")
    return [path for path in listed.stdout.split("\0") if path]


@pytest.fixture(scope="module")
def wheel(tracked_files, tmp_path_factory) -> Path:
    """The wheel built, as CI's checkout would build it, from a copy of the tracked files."""
    source = tmp_path_factory.mktemp("source")
    for path in tracked_files:
        if (ROOT / path).exists():  # a file deleted but not yet committed is still listed
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path, follow_symlinks=False)
    dist = tmp_path_factory.mktemp("dist")
    # no build isolation: this venv's setuptools builds offline (torch already requires one new enough)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source], cwd=dist)
    (built,) = dist.glob("sdlora-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A venv holding only the installed wheel, with this venv's dependencies importable."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    # pip runs under the fresh interpreter, so the console script's #! line points at the fresh venv
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], cwd=venv.parent)
    fresh_purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv.parent).strip())
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (fresh_purelib / "deps.pth").write_text("".join(f"{path}\n" for path in outer), encoding="utf-8")
    return venv


def test_every_tracked_file_under_sdlora_is_in_the_wheel(wheel, tracked_files):
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    missing = [path for path in tracked_files if path.startswith("sdlora/") and path not in shipped]
    assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools.package-data] in pyproject.toml (or to .gitignore)"


def test_version_has_one_source_that_the_wheel_the_cli_and_the_metadata_agree_on(fresh_venv, wheel, tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project["dynamic"], "pyproject.toml must read the version from sdlora/core/version.py"
    written = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "sdlora/core/version.py").read_text(encoding="utf-8"), re.M)
    assert written, "sdlora/core/version.py must assign __version__ a plain string: setuptools reads it statically"
    version = written.group(1)
    assert wheel.name.startswith(f"sdlora-{version}-")
    printed = _run([fresh_venv / "bin/python", "-c", VERSIONS], cwd=tmp_path).splitlines()
    assert Path(printed[0]).is_relative_to(fresh_venv), f"sdlora was imported from {printed[0]}, not from the installed wheel"
    assert printed[1:] == [version, version]
    assert _run([fresh_venv / "bin/sdlora", "--version"], cwd=tmp_path).split() == ["sdlora", version]


def _readme_main_job() -> list[str]:
    """What follows `sdlora` in the README's first `sdlora train` command (in a ```bash block, maybe after `... &&`)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"^```bash\n(.*?)^```", readme, re.M | re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            for start in range(len(words)):
                if words[start : start + 2] == ["sdlora", "train"] and (start == 0 or words[start - 1] in ("&&", ";")):
                    end = next((i for i in range(start, len(words)) if words[i] in ("&&", ";", "||", "|")), len(words))
                    return words[start + 1 : end]
    raise AssertionError("README.md has no `sdlora train` command in a ```bash block")


@pytest.mark.slow
def test_readme_main_job_and_style_measure_run_from_the_installed_wheel(fresh_venv, tmp_path):
    (tmp_path / "datasets_examples").symlink_to(ROOT / "datasets_examples", target_is_directory=True)
    train_args = _readme_main_job()
    _run([fresh_venv / "bin/sdlora", *train_args, *FAST_RUN], cwd=tmp_path, timeout=600)
    out = tmp_path / train_args[train_args.index("--output") + 1]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and len(list(out.glob("*.safetensors"))) == 2

    # the style classifier's weights are package data: measure the trained LoRA's pictures with them
    imported_from, flat_poster_probability = _run(
        [fresh_venv / "bin/python", "-c", STYLE_MEASURE, out / "pytorch_lora_weights.safetensors"], cwd=tmp_path
    ).splitlines()[-2:]
    assert Path(imported_from).is_relative_to(fresh_venv), f"sdlora was imported from {imported_from}, not from the installed wheel"
    assert math.isfinite(float(flat_poster_probability)) and 0.0 <= float(flat_poster_probability) <= 1.0
