"""Faults during training: SIGKILL at chosen moments, a full disk (a real size-limited tmpfs where the kernel allows
one, an injected ENOSPC everywhere), and non-finite losses and gradients. After each fault nothing corrupt is left,
the last complete checkpoint loads, and resuming ends with the LoRA of a run that was never interrupted."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.storage.atomic import TMP_PREFIX
from sdlora.training import checkpoint
from sdlora.training.recipe import TrainingDiverged, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = 8
TRAIN_ARGS = ["--model", "tiny", "--resolution", "64", "--rank", "4", "--alpha", "8", "--steps", str(STEPS), "--batch-size", "2",
              "--lr", "1e-3", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--cache", "disk", "--validate-every", "4",
              "--sample-steps", "1", "--trigger", "sks", "--seed", "5"]  # fmt: skip

# `python -c` wrapper around the real CLI: prints a marker at the moments a kill should land in, and stretches
# them (a tiny model writes a checkpoint in milliseconds) so the kill lands inside, not after
CHAOS_RUNNER = textwrap.dedent("""
    import sys, time
    import sdlora.training.cache, sdlora.training.checkpoint, sdlora.training.recipe
    from sdlora.cli import main

    def marked(kind, function, pause):
        def wrapper(*args, **kwargs):
            print("AT", kind, flush=True)
            time.sleep(pause)
            return function(*args, **kwargs)
        return wrapper

    sdlora.training.checkpoint._fsync_file = marked("checkpoint", sdlora.training.checkpoint._fsync_file, 0.1)  # between its files
    sdlora.training.cache.save_file = marked("cache", sdlora.training.cache.save_file, 0.2)  # the entry's temporary file exists
    sdlora.training.recipe.diffusion_loss = marked("step", sdlora.training.recipe.diffusion_loss, 0.0)
    sys.exit(main(sys.argv[1:]))
""")


def lora_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pytorch_lora_weights.safetensors")


def assert_nothing_corrupt(out: Path) -> None:
    """Every file outside temporary names is whole; the newest complete checkpoint loads."""
    for path in out.rglob("*"):
        if any(part.startswith(TMP_PREFIX) for part in path.relative_to(out).parts) or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name == "metrics.jsonl":
            lines = path.read_text().split("\n")
            for line in lines[:-1]:  # complete lines; a torn last one (no newline yet) is cut off by the next run
                json.loads(line)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
    latest = checkpoint.latest_checkpoint(out / "checkpoints")
    if latest is not None:
        for file in latest.glob("*.safetensors"):
            load_file(file)
        torch.load(latest / checkpoint.OPTIMIZER_FILE, weights_only=True)


def reference_run(data: Path, out: Path) -> dict[str, torch.Tensor]:
    """The uninterrupted run, in a process like the others (same thread count, so the same float rounding)."""
    result = subprocess.run(
        [sys.executable, "-m", "sdlora", "train", str(data), "--output", str(out), *TRAIN_ARGS],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return lora_of(out)


def run_until(data: Path, out: Path, kill_at: tuple[str, int] | None, rng: random.Random) -> tuple[str, int]:
    """One attempt, resuming the latest checkpoint if there is one; SIGKILL at the n-th marker of a kind (plus up
    to 50 ms). Returns ('killed' or 'finished', the exit code)."""
    resume = ["--resume", "latest"] if checkpoint.latest_checkpoint(out / "checkpoints") else []
    process = subprocess.Popen([sys.executable, "-c", CHAOS_RUNNER, "train", str(data), "--output", str(out), *TRAIN_ARGS, *resume],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = {"checkpoint": 0, "cache": 0, "step": 0}
    try:
        for line in process.stdout:
            if line.startswith("AT "):
                kind = line.split()[1]
                seen[kind] += 1
                if kill_at and kill_at[0] == kind and seen[kind] == kill_at[1]:
                    time.sleep(rng.uniform(0, 0.05))
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=60)
                    return "killed", process.returncode
        process.wait(timeout=300)
        return "finished", process.returncode
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        stderr = process.stderr.read()
        process.stdout.close()
        process.stderr.close()
        run_until.last_stderr = stderr


@pytest.mark.slow
def test_sigkill_at_chosen_moments_then_resume_ends_with_the_uninterrupted_lora(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "data", count=4)
    expected = reference_run(data, tmp_path / "straight")
    out = tmp_path / "chaos"
    rng = random.Random(20261123)
    # cache building, a step, a checkpoint write (twice, at different files), a step after resuming
    plan = [
        ("cache", 2),
        ("step", rng.randint(1, 3)),
        ("checkpoint", rng.randint(2, 6)),
        ("step", rng.randint(2, 4)),
        ("checkpoint", rng.randint(3, 9)),
    ]
    kills = 0
    for kill_at in plan:
        outcome, code = run_until(data, out, kill_at, rng)
        assert outcome == "killed" and code == -signal.SIGKILL, f"{kill_at}: {outcome} {code}\n{run_until.last_stderr[-2000:]}"
        kills += 1
        assert_nothing_corrupt(out)
    outcome, code = run_until(data, out, None, rng)
    assert (outcome, code) == ("finished", 0), run_until.last_stderr[-3000:]
    assert kills == len(plan)
    assert not list(out.rglob(TMP_PREFIX + "*")), "the finished run left temporaries behind"
    assert_nothing_corrupt(out)
    actual = lora_of(out)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, however often it was redone


# ---------------------------------------------------------------- a full disk


def _tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


FULL_DISK_SCRIPT = """
set -u
mkdir -p "$DISK"
mount -t tmpfs -o size=$SIZE tmpfs "$DISK"
"$PYTHON" -m sdlora train "$DATA" --output "$DISK/run" $ARGS > "$LOGS/first.out" 2> "$LOGS/first.err"
echo $? > "$LOGS/first.code"
ls -R "$DISK/run" > "$LOGS/first.files" 2>&1
mount -o remount,size=64m "$DISK"
"$PYTHON" -m sdlora train "$DATA" --output "$DISK/run" $ARGS --resume latest > "$LOGS/second.out" 2> "$LOGS/second.err"
echo $? > "$LOGS/second.code"
cp "$DISK/run/pytorch_lora_weights.safetensors" "$LOGS/" 2>/dev/null
exit 0
"""


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_available(), reason="no user namespaces to mount a size-limited tmpfs in")
def test_real_full_disk_fails_in_one_line_and_resumes_when_space_is_freed(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "data", count=4)
    expected = reference_run(data, tmp_path / "straight")
    logs = tmp_path / "logs"
    logs.mkdir()
    # 1.6 MiB: room for the cache, a checkpoint or two (0.6 MiB each) and the log, not for the whole run
    env = {
        **ENV,
        "DISK": str(tmp_path / "disk"),
        "SIZE": "1600k",
        "PYTHON": sys.executable,
        "DATA": str(data),
        "LOGS": str(logs),
        "ARGS": " ".join(TRAIN_ARGS),
    }
    subprocess.run(["unshare", "-Urm", "sh", "-c", FULL_DISK_SCRIPT], env=env, check=True, timeout=600)
    first_err = (logs / "first.err").read_text()
    assert (logs / "first.code").read_text().strip() == "2", first_err[-3000:]
    errors = [line for line in first_err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in first_err, first_err[-3000:]
    assert "no space left on device" in errors[0] and "--resume latest" in errors[0], errors[0]
    assert "step-" in errors[0], f"the error should name the last complete checkpoint: {errors[0]}"
    assert (logs / "second.code").read_text().strip() == "0", (logs / "second.err").read_text()[-3000:]
    actual = load_file(logs / "pytorch_lora_weights.safetensors")
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.slow  # over a second: subprocesses or several training runs
@pytest.mark.parametrize("where", ["cache", "samples", "final"])
def test_injected_full_disk_is_one_line_and_resume_finishes_the_run(tmp_path, monkeypatch, capsys, where, make_dataset):
    """Wherever the disk fills (a cache entry, a sample grid, the final files), the CLI says so in one line naming
    the last complete checkpoint, leaves no temporaries, and the resumed run ends with the straight run's LoRA."""
    import sdlora.training.cache
    import sdlora.training.outputs
    import sdlora.training.validation

    data = make_dataset(tmp_path / "data", count=4)
    args = ["train", str(data), "--output", str(tmp_path / "run"), "--model", "tiny", "--resolution", "64", "--rank", "4", "--alpha", "8", "--steps", "4",
            "--batch-size", "2", "--checkpoint-every", "2", "--cache", "disk", "--validate-every", "2", "--sample-steps", "1", "--trigger", "sks", "--seed", "3"]  # fmt: skip
    assert main([*args[:3], str(tmp_path / "straight"), *args[4:]]) == 0
    expected = lora_of(tmp_path / "straight")
    capsys.readouterr()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "the-file")

    target = {
        "cache": (sdlora.training.cache, "save_file"),
        "samples": (sdlora.training.validation, "image_grid"),
        "final": (sdlora.training.outputs, "write_config_and_card"),
    }[where]
    with monkeypatch.context() as patch:
        patch.setattr(*target, full)
        code = main(args)
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line]  # the rest is tqdm's progress
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdlora train: error: no space left on device writing "), stderr[-2000:]
    assert TMP_PREFIX not in err[0]  # it names the output, not its temporary name
    assert not list((tmp_path / "run").rglob(TMP_PREFIX + "*"))
    if where == "cache":
        assert "no checkpoint was written yet: free space, then run again" in err[0]
        assert main(args) == 0  # nothing to resume: the run starts again
    else:
        assert "--resume latest" in err[0] and ("step-00000002" in err[0] or "step-00000004" in err[0]), err[0]
        assert main([*args, "--resume", "latest"]) == 0
    actual = lora_of(tmp_path / "run")
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ---------------------------------------------------------------- non-finite numbers


def test_nan_loss_from_the_cli_names_the_step_the_fixes_and_keeps_the_last_good_checkpoint(tmp_path, capsys, make_dataset):
    data = make_dataset(tmp_path / "data", count=4)
    out = tmp_path / "run"
    code = main(["train", str(data), "--output", str(out), "--model", "tiny", "--resolution", "64", "--rank", "4", "--alpha", "8",
                 "--steps", "6", "--batch-size", "2", "--lr", "1e30", "--max-grad-norm", "0", "--checkpoint-every", "1",
                 "--validate-every", "0", "--sample-steps", "1", "--trigger", "sks"])  # fmt: skip
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line]  # the rest is tqdm's progress
    assert code == 2 and len(err) == 1, stderr[-2000:]
    message = err[0]
    assert message.startswith("sdlora train: error: training stopped at step ") and "lower --lr" in message, message
    failed_at = int(message.split("step ")[1].split(":")[0])
    latest = checkpoint.latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.name == f"step-{failed_at - 1:08d}" and str(latest) in message
    tensors = load_file(latest / checkpoint.LORA_FILE)
    assert all(torch.isfinite(t).all() for t in tensors.values())  # the kept checkpoint is a good one
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no final file from a diverged run


def test_nan_gradient_with_a_finite_loss_stops_too_and_suggests_bf16_under_fp16(tmp_path, monkeypatch, make_dataset, tiny_config):
    import sdlora.training.recipe

    real = sdlora.training.recipe.diffusion_loss

    def nan_gradient(unet, *args, **kwargs):
        loss = real(unet, *args, **kwargs)
        weight = next(p for p in unet.parameters() if p.requires_grad)
        return loss + torch.sqrt(weight.float().sum() - weight.float().sum().detach()) * 0  # value 0, gradient nan

    monkeypatch.setattr(sdlora.training.recipe, "diffusion_loss", nan_gradient)
    config = tiny_config(make_dataset(tmp_path / "data", count=4), tmp_path / "run", mixed_precision="fp16", steps=2, checkpoint_every=1)
    with pytest.raises(TrainingDiverged) as caught:
        train(config)
    message = str(caught.value)
    assert (
        "step 1" in message
        and "gradient norm became nan" in message
        and "--mixed-precision bf16" in message
        and "no checkpoint was written yet" in message
    )
