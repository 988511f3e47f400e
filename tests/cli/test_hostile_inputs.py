"""Hostile numbers, sizes and files through the real CLI, in subprocesses (issue 24): absurd or non-finite weights,
scales and guidance, an image that comes out NaN, huge repeats and sample sizes, a model with a repeated key, a
single file whose VAE is not LDM-named, a full small disk. Every case must exit non-zero with one line on stderr
naming the option, file or key at fault, print no traceback, and leave nothing new where the output would have gone.
The library checks behind them have their own unit tests beside each module's.

Cases run a few at a time with one thread each, as in test_hostile.py (each process imports torch).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdlora.core.files import write_kohya
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.storage.atomic import TMP_PREFIX

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PARALLEL = 3
TRAIN_FAST = [
    "--resolution",
    "64",
    "--rank",
    "4",
    "--steps",
    "1",
    "--sample-steps",
    "1",
    "--validate-every",
    "0",
    "--checkpoint-every",
    "0",
]


@dataclass
class Case:
    argv: list[str]
    names: str  # what the error line must name (a path, an option or a key)
    reason: str  # and a word of why, or what to do
    watch: Path  # the folder the output would go into: nothing may appear in it
    late: bool = False  # found only once the model ran: its progress bars may stand before the error line


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def run_case(case: Case) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "sdlora", *case.argv], capture_output=True, text=True, env=ENV, timeout=300)
    return result.returncode, result.stdout, result.stderr


def with_a_repeated_key(source: Path, target: Path, ending: str = "attn2.to_k.weight") -> str:
    """`source` written again with one weight's name given a second time in the header, for a [3, 5] tensor appended
    to the data: a reader that keeps JSON's last entry sees that shape instead of the weight's."""
    raw = source.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text, data = raw[8 : 8 + length].decode().rstrip(), raw[8 + length :]
    name = sorted(key for key in json.loads(text) if key.endswith(ending))[0]
    extra = bytes(4 * 3 * 5)
    entry = {"dtype": "F32", "shape": [3, 5], "data_offsets": [len(data), len(data) + len(extra)]}
    header = (text[:-1] + "," + json.dumps(name) + ":" + json.dumps(entry) + "}").encode()
    header += b" " * (-len(header) % 8)
    target.write_bytes(struct.pack("<Q", len(header)) + header + data + extra)
    return name


def build_cases(root: Path, model_dir: Path, sdxl_dir: Path, random_lora_state, make_dataset, write_sdxl_single_file) -> dict[str, Case]:
    pipe = build_tiny_pipeline()
    lora_dir = root / "loras"
    good = write_kohya(random_lora_state(pipe, rank=4, alpha=8.0), lora_dir / "good.safetensors")
    other = write_kohya(random_lora_state(pipe, rank=4, alpha=8.0, seed=2), lora_dir / "other.safetensors")
    data = make_dataset(root / "data", count=2)
    cases: dict[str, Case] = {}

    def out(case: str) -> Path:
        folder = root / "outs" / case
        folder.mkdir(parents=True)
        return folder

    def generate(case: str, *extra: str, names: str, reason: str, late: bool = False) -> None:
        watch = out(case)
        argv = ["generate", "--model", "tiny", "--steps", "1", "--out", str(watch / "images"), *extra]
        cases[case] = Case(argv if "--prompt" in extra else [*argv, "--prompt", "a cat"], names, reason, watch, late)

    def command(case: str, argv: list[str], output: str, names: str, reason: str) -> None:
        watch = out(case)
        cases[case] = Case([*argv, str(watch / output)], names, reason, watch)

    # ---- 8: non-finite and absurd weights, scales and guidance, refused before the model loads; one rule for --lora
    generate("generate-lora-tag-weight-1e30", "--prompt", "a cat <lora:good:1e30>", "--lora-dir", str(lora_dir),
             names="<lora:good:1e30>", reason="between -100 and 100")  # fmt: skip
    generate("generate-lora-scale-1e30", "--lora", f"{good}:1e30", names=f"--lora {good}:1e30", reason="between -100 and 100")
    generate("generate-guidance-nan", "--guidance", "nan", names="--guidance nan", reason="from 0 to 100")
    command("merge-lora-scale-1e30", ["merge", "--model", str(model_dir), "--lora", f"{good}:1e30", "--out"], "merged",
            f"--lora {good}:1e30", "between -100 and 100")  # fmt: skip
    command("grid-guidance-inf", ["grid", "--model", "tiny", "--lora-steps", str(good), "--guidance", "1,inf", "--prompt", "a cat", "--out"],
            "grid", "--guidance '1,inf'", "finite")  # fmt: skip
    command("resize-dynamic-sv-ratio-nan", ["resize", str(good), "--dynamic", "sv_ratio:nan", "--out"], "small.safetensors",
            "--dynamic sv_ratio:nan", "above 1")  # fmt: skip
    command("combine-weight-1e300", ["combine", f"{good}:1e300", str(other), "--rank", "2", "--out"], "both.safetensors",
            f"{good}:1e300", "between -100 and 100")  # fmt: skip
    # finite weights whose update overflows: the image comes out NaN and is refused, not saved black
    overflowing = random_lora_state(pipe, rank=4, alpha=8.0)
    for module in overflowing.modules.values():
        module.up = module.up * 1e30
    huge = write_kohya(overflowing, root / "overflow" / "huge.safetensors")
    generate("generate-image-comes-out-nan", "--lora", str(huge), "--seed", "5", names="seed 5", reason="NaN or inf", late=True)

    # ---- 13: sizes and counts that would exhaust memory, found before training starts
    toml = root / "huge-repeats.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data.as_posix()}'\nnum_repeats = 1000000000000\n")
    command("dataset-toml-num-repeats-1e12", ["train", "--dataset-config", str(toml), "--model", "tiny", *TRAIN_FAST, "--output"], "run",
            f"{toml}: datasets[0].subsets[0]: num_repeats 1000000000000", "above 10000")  # fmt: skip
    prompts = root / "huge-samples.txt"
    prompts.write_text("a red circle --w 100000 --h 100000\n")
    command("sample-prompts-size-100000", ["train", str(data), "--sample-prompts", str(prompts), "--model", "tiny", *TRAIN_FAST, "--output"],
            "run", f"{prompts}:1: --w 100000", "larger than 8192")  # fmt: skip
    diffusers_vae = write_sdxl_single_file(sdxl_dir, root / "xl-diffusers-vae.safetensors")  # its VAE keys are diffusers' names
    generate("single-file-vae-not-ldm-named", "--model", str(diffusers_vae), "--model-config", str(sdxl_dir),
             names=str(diffusers_vae), reason="not in the LDM layout")  # fmt: skip

    # ---- 14: a model's broken header was blamed on the LoRA
    repeated = root / "repeated-key"
    shutil.copytree(model_dir, repeated)
    unet_file = repeated / "unet" / "diffusion_pytorch_model.safetensors"
    name = with_a_repeated_key(model_dir / "unet" / "diffusion_pytorch_model.safetensors", unet_file)
    command("merge-model-with-a-repeated-key", ["merge", "--model", str(repeated), "--lora", str(good), "--out"], "merged",
            str(unet_file), f"names '{name}' twice")  # fmt: skip
    return cases


CASE_NAMES = [
    "generate-lora-tag-weight-1e30", "generate-lora-scale-1e30", "generate-guidance-nan", "merge-lora-scale-1e30",
    "grid-guidance-inf", "resize-dynamic-sv-ratio-nan", "combine-weight-1e300", "generate-image-comes-out-nan",
    "dataset-toml-num-repeats-1e12", "sample-prompts-size-100000", "single-file-vae-not-ldm-named",
    "merge-model-with-a-repeated-key",
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir, tiny_sdxl_dir, random_lora_state, make_dataset, write_sdxl_single_file):
    root = tmp_path_factory.mktemp("hostile-inputs")
    cases = build_cases(root, tiny_model_dir, tiny_sdxl_dir, random_lora_state, make_dataset, write_sdxl_single_file)
    assert list(cases) == CASE_NAMES
    before = {name: snapshot(case.watch) for name, case in cases.items()}
    # the slowest first (it loads the model and runs it), so the pool ends together
    order = sorted(cases, key=lambda name: not cases[name].late)
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(order, pool.map(run_case, [cases[name] for name in order])))
    return root, cases, results, before


def check_error_line(case: Case, code: int, stdout: str, stderr: str) -> str:
    assert code != 0, f"exit 0\n{stderr[-2000:]}"
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    lines = stderr.strip().splitlines()
    if not case.late:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr[-3000:]}"
    line = lines[-1]
    assert line.startswith(f"sdlora {case.argv[0]}: error: "), stderr[-3000:]
    assert sum("error" in other for other in lines) == 1, stderr[-3000:]
    assert case.names in line, f"the error does not name {case.names}: {line}"
    assert case.reason.lower() in line.lower(), f"the error does not say '{case.reason}': {line}"
    return line


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_input_is_one_actionable_line(hostile, name):
    root, cases, results, before = hostile
    case = cases[name]
    check_error_line(case, *results[name])
    assert snapshot(case.watch) == before[name], f"{name}: left files behind: {snapshot(case.watch)}"
    assert not [p for p in root.rglob(f"{TMP_PREFIX}*")], "a temporary file was left"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only), unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_tiny_model_onto_a_full_small_disk_says_no_space(small_disk):
    target = small_disk / "model"
    case = Case(["tiny-model", str(target)], str(target), "No space left on device", small_disk)
    check_error_line(case, *run_case(case))
    assert snapshot(small_disk) == []
