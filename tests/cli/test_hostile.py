"""Hostile input through the real CLI, in subprocesses: every case must exit non-zero with one actionable line on
stderr naming the file or option at fault, print no traceback, and leave nothing new (or half-written) where the
output would have gone. One case (a corrupt image among good ones) must instead train on, naming the bad file.

Cases run a few at a time with one thread each: each process imports torch, so running them all at once on a
small machine only makes every one slower.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.core.files import write_kohya
from sdlora.models.loading import write_tiny_model
from sdlora.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from sdlora.storage.atomic import TMP_PREFIX

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PARALLEL = 3
TRAIN_FAST = [
    "--resolution",
    "64",
    "--rank",
    "4",
    "--alpha",
    "8",
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
    names: str  # what the error line must name (a path or an option)
    reason: str  # and a word of why, or what to do
    watch: Path  # the folder the output would go into: nothing may appear in it
    prefix: list[str] = field(default_factory=list)  # e.g. run as an unprivileged user


class RunsCode:
    """Unpickling this runs a shell command, as a malicious .ckpt would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def as_unprivileged() -> list[str] | None:
    """A prefix that takes away root's power to write anywhere (chmod means nothing to root), or None."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-U"]  # a user namespace without a mapping: the process runs as `nobody`
    return None


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def build_cases(root: Path, random_lora_state, make_dataset, write_sdxl_single_file) -> dict[str, Case]:
    pipe = build_tiny_pipeline()
    model_dir = write_tiny_model(root / "models" / "tiny")
    good_lora = write_kohya(random_lora_state(pipe, rank=4, alpha=8.0), root / "loras" / "good.safetensors")
    good_data = make_dataset(root / "data" / "good", count=4)
    cases: dict[str, Case] = {}

    def out(case: str) -> Path:
        folder = root / "outs" / case
        folder.mkdir(parents=True)
        return folder

    def train(case: str, data: Path, *extra: str, names: str, reason: str, output: Path | None = None) -> None:
        watch = out(case)
        target = output or watch / "run"
        cases[case] = Case(["train", str(data), "--model", "tiny", "--output", str(target), *TRAIN_FAST, *extra], names, reason, watch)

    # ---- data
    empty = root / "data" / "empty"
    empty.mkdir(parents=True)
    train("empty-data-folder", empty, names=str(empty), reason="no images")
    corrupt = root / "data" / "corrupt"
    corrupt.mkdir()
    for index in range(3):
        (corrupt / f"photo{index}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
        (corrupt / f"photo{index}.txt").write_text("a photo")
    train("only-corrupt-images", corrupt, names=str(corrupt), reason="failed to open")
    uncaptioned = make_dataset(root / "data" / "uncaptioned", count=3)
    for caption in uncaptioned.glob("*.txt"):
        caption.unlink()
    train("no-caption-no-fallback", uncaptioned, names="img00.png", reason="--caption")
    for case, line in {
        "metadata-bad-line": '{"file_name": "img00.png", "text": "a red circle"',
        "metadata-parent-path": '{"file_name": "../good/img00.png", "text": "a red circle"}',
        "metadata-absolute-path": json.dumps({"file_name": str(good_data / "img00.png"), "text": "a red circle"}),
    }.items():
        folder = make_dataset(root / "data" / case, count=2)
        (folder / "metadata.jsonl").write_text('{"file_name": "img01.png", "text": "a blue circle"}\n' + line + "\n")
        train(case, folder, names="metadata.jsonl", reason="line 2")

    # ---- base model
    train(
        "model-missing",
        good_data,
        "--model",
        str(root / "models" / "no-such-model"),
        names=str(root / "models" / "no-such-model"),
        reason="not found",
    )
    no_unet = root / "models" / "no-unet"
    shutil.copytree(model_dir, no_unet)
    shutil.rmtree(no_unet / "unet")
    train("model-folder-without-unet", good_data, "--model", str(no_unet), names=str(no_unet), reason="unet")
    unet_weights = next((model_dir / "unet").glob("*.safetensors"))
    truncated_model = root / "models" / "truncated.safetensors"
    truncated_model.write_bytes(unet_weights.read_bytes()[: unet_weights.stat().st_size // 2])
    train("model-truncated-safetensors", good_data, "--model", str(truncated_model), names=str(truncated_model), reason="truncated")
    text_model = root / "models" / "notes.safetensors"
    text_model.write_text("my notes about models\n")
    train(
        "model-text-named-safetensors", good_data, "--model", str(text_model), names=str(text_model), reason="not a readable .safetensors"
    )
    pickle_model = root / "models" / "model.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}}, pickle_model)
    train("model-pickle-without-flag", good_data, "--model", str(pickle_model), names=str(pickle_model), reason="--allow-pickle")
    evil_model = root / "models" / "evil.ckpt"
    with open(evil_model, "wb") as handle:
        pickle.dump({"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(1)}, "x": RunsCode(root / "MARKER")}, handle)
    train(
        "model-code-running-pickle-with-flag",
        good_data,
        "--model",
        str(evil_model),
        "--allow-pickle",
        names=str(evil_model),
        reason="could run code",
    )

    # ---- options
    for option, value, reason in [
        ("--rank", "0", "at least 1"),
        ("--steps", "-1", "at least 1"),
        ("--lr", "nan", "finite"),
        ("--resolution", "30", "multiple of 8"),
    ]:
        train(f"option{option}={value}", good_data, option, value, names=option, reason=reason)

    # ---- output
    watch = out("output-is-a-file")
    (watch / "run").write_text("an existing file\n")
    cases["output-is-a-file"] = Case(
        ["train", str(good_data), "--model", "tiny", "--output", str(watch / "run"), *TRAIN_FAST],
        str(watch / "run"),
        "existing file",
        watch,
    )
    unprivileged = as_unprivileged()
    if unprivileged is not None:
        watch = out("output-folder-unwritable")
        locked = watch / "locked"
        locked.mkdir()
        os.chmod(watch, 0o755)
        os.chmod(root, 0o755)
        cases["output-folder-unwritable"] = Case(
            ["train", str(good_data), "--model", "tiny", "--output", str(locked / "run"), *TRAIN_FAST],
            str(locked),
            "permission denied",
            watch,
            unprivileged,
        )
        os.chmod(locked, 0o555)

    # ---- LoRA files given to generate, merge and convert
    truncated = root / "loras" / "truncated.safetensors"
    truncated.write_bytes(good_lora.read_bytes()[: good_lora.stat().st_size // 2])
    text = root / "loras" / "readme.safetensors"
    text.write_text("# my LoRA\nTrained on my photos.\n")
    xl_state = random_lora_state(pipe, rank=4, alpha=8.0, text_encoder=False)
    for module in xl_state.modules.values():  # SDXL-sized inputs: the shapes do not fit SD1
        module.down = module.down.new_ones(module.rank, 2048)
    xl = write_kohya(xl_state, root / "loras" / "sdxl.safetensors")
    poisoned_tensors = load_file(good_lora)
    first_down = sorted(key for key in poisoned_tensors if key.endswith("lora_down.weight"))[0]
    poisoned_tensors[first_down][0, 0] = float("nan")
    poisoned = root / "loras" / "diverged.safetensors"
    save_file(poisoned_tensors, str(poisoned))
    pickled = root / "loras" / "lora.bin"
    torch.save(load_file(good_lora), pickled)
    evil = root / "loras" / "evil.ckpt"
    with open(evil, "wb") as handle:
        pickle.dump({"lora_unet_a.lora_down.weight": torch.ones(1, 1), "x": RunsCode(root / "MARKER")}, handle)
    lora_cases = {
        "lora-truncated": (truncated, "truncated", []),
        "lora-text-named-safetensors": (text, "not a readable .safetensors", []),
        "lora-other-architecture": (xl, "SDXL", []),
        "lora-pickle-without-flag": (pickled, "--allow-pickle", []),
        "lora-code-running-pickle-with-flag": (evil, "could run code", ["--allow-pickle"]),
        "lora-nan-values": (poisoned, "NaN or inf", []),
    }
    for case, (lora_path, reason, extra) in lora_cases.items():
        watch = out(f"generate-{case}")
        cases[f"generate-{case}"] = Case(
            [
                "generate",
                "--model",
                "tiny",
                "--prompt",
                "a cat",
                "--steps",
                "1",
                "--lora",
                f"{lora_path}:0.8",
                "--out",
                str(watch / "images"),
                *extra,
            ],
            str(lora_path),
            reason,
            watch,
        )
        watch = out(f"merge-{case}")
        cases[f"merge-{case}"] = Case(
            ["merge", "--model", str(model_dir), "--lora", f"{lora_path}:0.8", "--out", str(watch / "merged"), *extra],
            str(lora_path),
            reason,
            watch,
        )
    # ---- a LoRA to train further (--init-lora) that cannot be
    missing_lora = root / "loras" / "gone.safetensors"
    train("init-lora-missing", good_data, "--init-lora", str(missing_lora), names=str(missing_lora), reason="no such file")
    train(
        "init-lora-other-rank",
        good_data,
        "--init-lora",
        str(good_lora),
        "--train-text-encoder",
        "--rank",
        "8",
        names=str(good_lora),
        reason="--rank 4",
    )
    train("init-lora-text-encoder-layers", good_data, "--init-lora", str(good_lora), names=str(good_lora), reason="--train-text-encoder")
    train("init-lora-nan-values", good_data, "--init-lora", str(poisoned), "--train-text-encoder", names=str(poisoned), reason="NaN or inf")
    watch = out("merge-model-without-unet")
    cases["merge-model-without-unet"] = Case(
        ["merge", "--model", str(no_unet), "--lora", str(good_lora), "--out", str(watch / "merged")], str(no_unet), "unet", watch
    )
    watch = out("merge-output-is-a-file")
    (watch / "merged").write_text("an existing file\n")
    cases["merge-output-is-a-file"] = Case(
        ["merge", "--model", str(model_dir), "--lora", str(good_lora), "--out", str(watch / "merged")],
        str(watch / "merged"),
        "existing file",
        watch,
    )
    watch = out("convert-truncated")
    cases["convert-truncated"] = Case(
        ["convert", str(truncated), str(watch / "lora.safetensors"), "--to", "diffusers"], str(truncated), "truncated", watch
    )
    # ---- one family's LoRA or model where another's belongs (SDXL)
    sdxl_dir = write_tiny_model(root / "models" / "tiny-sdxl", variant="sdxl")
    sdxl_lora = write_kohya(random_lora_state(build_tiny_sdxl_pipeline(), rank=4, alpha=8.0), root / "loras" / "xl-three-parts.safetensors")
    # generate builds the tiny models in memory (a folder would print diffusers' loading progress); merge streams folders
    for case, built_in, folder, lora_path, reason in [
        ("sdxl-lora-into-sd1", "tiny", model_dir, sdxl_lora, "SDXL"),
        ("sd1-lora-into-sdxl", "tiny-sdxl", sdxl_dir, good_lora, "cross-attention width 80"),
    ]:
        watch = out(f"generate-{case}")
        cases[f"generate-{case}"] = Case(
            [
                "generate",
                "--model",
                built_in,
                "--prompt",
                "a cat",
                "--steps",
                "1",
                "--lora",
                str(lora_path),
                "--out",
                str(watch / "images"),
            ],
            str(lora_path),
            reason,
            watch,
        )
        watch = out(f"merge-{case}")
        cases[f"merge-{case}"] = Case(
            ["merge", "--model", str(folder), "--lora", str(lora_path), "--out", str(watch / "merged")], str(lora_path), reason, watch
        )
    no_te2 = write_sdxl_single_file(sdxl_dir, root / "models" / "xl-no-te2.safetensors", text_encoder_2=False)
    train("sdxl-single-file-without-text-encoder-2", good_data, "--model", str(no_te2), names=str(no_te2), reason="text_encoder_2")

    watch = out("generate-model-missing")
    cases["generate-model-missing"] = Case(
        ["generate", "--model", str(root / "models" / "gone"), "--prompt", "a cat", "--out", str(watch / "images")],
        str(root / "models" / "gone"),
        "not found",
        watch,
    )

    # ---- samplers, <lora:> tags, grids, sample-prompt files (#17)
    def generate(case: str, *extra: str, names: str, reason: str) -> None:
        watch = out(case)
        argv = ["generate", "--model", "tiny", "--steps", "1", "--out", str(watch / "images"), *extra]
        cases[case] = Case(argv if "--prompt" in extra else [*argv, "--prompt", "a cat"], names, reason, watch)

    generate("generate-unknown-sampler", "--sampler", "Eulr a", names="Eulr a", reason="did you mean 'Euler a'")
    lora_dir = good_lora.parent
    generate("generate-lora-tag-missing-file", "--prompt", "a cat <lora:godo:0.8>", "--lora-dir", str(lora_dir),
             names="<lora:godo:0.8>", reason="close matches: good")  # fmt: skip
    generate("generate-lora-tag-without-weight", "--prompt", "a cat <lora:good:>", "--lora-dir", str(lora_dir),
             names="<lora:good:>", reason="not a number")  # fmt: skip
    generate("generate-lora-tag-without-lora-dir", "--prompt", "a cat <lora:good:1>", names="<lora:good:1>", reason="--lora-dir")
    watch = out("grid-axis-without-values")
    cases["grid-axis-without-values"] = Case(
        ["grid", "--model", "tiny", "--lora-steps", str(good_lora), "--weights", ",", "--prompt", "a cat", "--out", str(watch / "grid")],
        "--weights",
        "no values",
        watch,
    )
    watch = out("grid-three-varied-axes")
    argv = ["grid", "--model", "tiny", "--lora-steps", str(good_lora), "--weights", "0,1", "--seed", "1,2", "--steps", "1,2",
            "--prompt", "a cat", "--out", str(watch / "grid")]  # fmt: skip
    cases["grid-three-varied-axes"] = Case(argv, "weight, seed, steps", "two axes", watch)
    prompts = root / "prompts" / "samples.txt"
    prompts.parent.mkdir()
    prompts.write_text("# kohya sample prompts\na red circle --w 64 --h 64\na blue circle --q 3\n")
    # ---- kohya-style data folders (#15)
    for case, folder in (("subset-zero-repeats", "0_alpha"), ("subset-not-n-words", "x_alpha")):
        data = root / "data" / case
        make_dataset(data / "3_good", count=2)
        make_dataset(data / folder, count=2)
        train(case, data, names=str(data / folder), reason="N_words")
    train("keep-tokens-over-the-tags", good_data, "--keep-tokens", "9", "--shuffle-captions", names="--keep-tokens 9", reason="lower it")
    empty_reg = root / "data" / "empty-reg"
    empty_reg.mkdir()
    train(
        "reg-folder-empty",
        good_data,
        "--reg-data",
        str(empty_reg),
        names=f"--reg-data: no images (png, jpg, jpeg, webp) found in {empty_reg}",
        reason="no images",
    )
    typo = root / "data" / "typo.toml"
    typo.write_text(f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{good_data.as_posix()}'\n  flip_augment = true\n")
    cases["dataset-config-misspelt-key"] = Case(
        ["train", "--dataset-config", str(typo), "--model", "tiny", "--output", str(out("dataset-config-misspelt-key") / "run"), *TRAIN_FAST],
        "unknown key 'flip_augment'", "did you mean 'flip_aug'", root / "outs" / "dataset-config-misspelt-key",
    )  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:  # as on CPU machines; where it imports, 8-bit AdamW runs
        train("optimizer-not-installed", good_data, "--optimizer", "adamw8bit", names="--optimizer adamw8bit", reason="pip install")
    train("optimizer-args-not-taken", good_data, "--optimizer", "prodigy", "--optimizer-args", "d_coef=2", "nonsense=3",
          names="nonsense", reason="takes no argument")  # fmt: skip
    train("tracker-not-installed", good_data, "--report-to", "wandb", names="--report-to wandb", reason="pip install")
    train("sample-prompts-unknown-option", good_data, "--sample-prompts", str(prompts), names=f"{prompts}:3", reason="unknown option --q")
    return cases


def run_case(case: Case) -> tuple[int, str, str]:
    result = subprocess.run(
        [*case.prefix, sys.executable, "-m", "sdlora", *case.argv], capture_output=True, text=True, env=ENV, timeout=300
    )
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def hostile(
    tmp_path_factory, random_lora_state, make_dataset, write_sdxl_single_file
) -> tuple[Path, dict[str, Case], dict[str, tuple[int, str, str]], dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("hostile")
    cases = build_cases(root, random_lora_state, make_dataset, write_sdxl_single_file)
    assert set(cases) <= set(CASE_NAMES) and set(CASE_NAMES) - set(cases) <= {"output-folder-unwritable", "optimizer-not-installed"}
    before = {name: snapshot(case.watch) for name, case in cases.items()}
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(cases, pool.map(run_case, cases.values())))
    return root, cases, results, before


LORA_CASES = [
    "lora-truncated",
    "lora-text-named-safetensors",
    "lora-other-architecture",
    "lora-pickle-without-flag",
    "lora-code-running-pickle-with-flag",
    "lora-nan-values",
]
CASE_NAMES = [
    "empty-data-folder", "only-corrupt-images", "no-caption-no-fallback", "metadata-bad-line", "metadata-parent-path",
    "metadata-absolute-path", "model-missing", "model-folder-without-unet", "model-truncated-safetensors",
    "model-text-named-safetensors", "model-pickle-without-flag", "model-code-running-pickle-with-flag", "option--rank=0", "option--steps=-1", "option--lr=nan",
    "option--resolution=30", "output-is-a-file", "output-folder-unwritable",
    *[f"{command}-{case}" for case in LORA_CASES for command in ("generate", "merge")],
    "init-lora-missing", "init-lora-other-rank", "init-lora-text-encoder-layers", "init-lora-nan-values",
    "merge-model-without-unet", "merge-output-is-a-file", "convert-truncated", "generate-model-missing",
    *[f"{command}-{case}" for case in ("sdxl-lora-into-sd1", "sd1-lora-into-sdxl") for command in ("generate", "merge")],
    "sdxl-single-file-without-text-encoder-2",
    "generate-unknown-sampler", "generate-lora-tag-missing-file", "generate-lora-tag-without-weight",
    "generate-lora-tag-without-lora-dir", "grid-axis-without-values", "grid-three-varied-axes", "sample-prompts-unknown-option",
    "tracker-not-installed", "subset-zero-repeats", "subset-not-n-words", "keep-tokens-over-the-tags", "reg-folder-empty",
    "dataset-config-misspelt-key", "optimizer-not-installed", "optimizer-args-not-taken",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_input_is_one_actionable_line(hostile, name):
    root, cases, results, before = hostile
    if name not in cases:
        pytest.skip("not testable here: running as root without user namespaces, or bitsandbytes installed")
    case = cases[name]
    code, stdout, stderr = results[name]
    assert code != 0, f"{name}: exit 0\n{stderr[-2000:]}"
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{stderr[-3000:]}"
    line = lines[0]
    assert line.startswith(f"sdlora {case.argv[0]}: error: "), line
    assert case.names in line, f"{name}: the error does not name {case.names}: {line}"
    assert case.reason.lower() in line.lower(), f"{name}: the error does not say '{case.reason}': {line}"
    assert snapshot(case.watch) == before[name], f"{name}: left files behind: {snapshot(case.watch)}"
    assert not (root / "MARKER").exists(), "a pickle ran code"
    assert not [p for p in root.rglob(f"{TMP_PREFIX}*")], "a temporary file was left"


@pytest.mark.slow
def test_corrupt_images_among_good_ones_are_skipped_with_a_warning_naming_them(tmp_path, make_dataset):
    import struct
    import zlib

    data = make_dataset(tmp_path / "data", count=4)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (data / "broken.txt").write_text("a broken photo")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    # a 100000 x 100000 PNG header over a few bytes of data: a decompression bomb, refused before decoding
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    (data / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    (data / "bomb.txt").write_text("a bomb")
    out = tmp_path / "out"
    code, stdout, stderr = run_case(
        Case(["train", str(data), "--model", "tiny", "--output", str(out), *TRAIN_FAST, "--trigger", "sks"], "", "", tmp_path)
    )
    assert code == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("sdlora: warning:")]
    assert len(warnings) == 1 and "skipped 2 unreadable" in warnings[0], stderr[-3000:]
    assert "broken.jpg" in warnings[0] and "bomb.png (DecompressionBombError" in warnings[0], warnings[0]
    assert "Traceback" not in stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    metadata = json.loads(
        subprocess.run(
            [sys.executable, "-m", "sdlora", "inspect", "--json", str(out / "lora.safetensors")],
            capture_output=True,
            text=True,
            env=ENV,
            check=True,
        ).stdout
    )["metadata"]
    assert metadata["ss_num_train_images"] == "4"  # the four good images, not the broken one
