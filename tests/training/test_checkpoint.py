"""checkpoint.py on a toy model: round trip, bit-identical resume, pruning, `latest`, full disk, SIGKILL mid-write."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler

from sdlora.storage.atomic import TMP_PREFIX
from sdlora.training import checkpoint
from sdlora.training.checkpoint import TrainState, find_checkpoint, latest_checkpoint, load_checkpoint, restore_rngs, save_checkpoint

SAMPLES = torch.linspace(-1, 1, 10 * 6).reshape(10, 6)
BATCH = 4


@dataclass
class Toy:
    """A two-layer net with dropout standing in for LoRA parameters, and everything a loop draws randomness from."""

    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    rng: random.Random
    generator: torch.Generator
    state: TrainState


def make_toy(seed: int) -> Toy:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=12)
    state = TrainState(step=0, epoch=0, batch_in_epoch=0)
    return Toy(
        model, dict(model.named_parameters()), optimizer, scheduler, random.Random(seed), torch.Generator().manual_seed(seed + 1), state
    )


def train_steps(toy: Toy, count: int) -> None:
    """Steps that use the data order (epoch, position), the Python RNG, the generator and the global RNG (dropout)."""
    for _ in range(count):
        order = torch.randperm(len(SAMPLES), generator=torch.Generator().manual_seed(toy.state.epoch))
        batch = order[toy.state.batch_in_epoch * BATCH : (toy.state.batch_in_epoch + 1) * BATCH]
        toy.state.batch_in_epoch += 1
        if toy.state.batch_in_epoch * BATCH >= len(SAMPLES):
            toy.state.epoch, toy.state.batch_in_epoch = toy.state.epoch + 1, 0
        inputs = SAMPLES[batch] + 0.1 * torch.randn(len(batch), 6, generator=toy.generator)
        target = torch.full((len(batch), 3), toy.rng.random())
        loss = torch.nn.functional.mse_loss(toy.model(inputs), target)
        loss.backward()
        toy.optimizer.step()
        toy.scheduler.step()
        toy.optimizer.zero_grad(set_to_none=True)
        toy.state.step += 1


def save(toy: Toy, checkpoints_dir: Path, keep: int = 3, extra_files=None) -> Path:
    toy.state.capture_rngs(toy.rng, toy.generator)
    return save_checkpoint(checkpoints_dir, toy.state, toy.trainable, toy.optimizer, toy.scheduler, keep, extra_files)


def resume(path: Path, seed: int = 99) -> Toy:
    """Fresh objects from another seed, then everything restored from `path`."""
    toy = make_toy(seed)
    toy.state = load_checkpoint(path, toy.trainable, toy.optimizer, toy.scheduler)
    restore_rngs(toy.state, toy.rng, toy.generator)
    return toy


def draws(toy: Toy) -> tuple:
    return toy.rng.random(), torch.randn(3, generator=toy.generator), torch.rand(3)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_round_trip_restores_params_optimizer_scheduler_and_rngs(tmp_path):
    toy = make_toy(0)
    train_steps(toy, 5)
    toy.state.extra = {"config_digest": "abc"}
    path = save(toy, tmp_path / "checkpoints")
    after_save = draws(toy)

    resumed = resume(path)
    for name, param in toy.trainable.items():
        assert torch.equal(resumed.trainable[name], param), name
    for param, resumed_param in zip(toy.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"]):
        saved_state, loaded_state = toy.optimizer.state[param], resumed.optimizer.state[resumed_param]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved_state[key], loaded_state[key]), key
    assert resumed.optimizer.param_groups[0]["lr"] == toy.optimizer.param_groups[0]["lr"] != 1e-2  # mid-schedule
    assert resumed.scheduler.last_epoch == toy.scheduler.last_epoch == 5
    assert resumed.scheduler.get_last_lr() == toy.scheduler.get_last_lr()
    assert (resumed.state.step, resumed.state.epoch, resumed.state.batch_in_epoch) == (5, 1, 2)
    assert resumed.state.extra == {"config_digest": "abc"}
    after_restore = draws(resumed)
    assert after_restore[0] == after_save[0]
    assert torch.equal(after_restore[1], after_save[1]) and torch.equal(after_restore[2], after_save[2])


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    straight = make_toy(0)
    train_steps(straight, 8)

    first_half = make_toy(0)
    train_steps(first_half, 3)
    path = save(first_half, tmp_path / "checkpoints")
    del first_half
    torch.manual_seed(1234)  # the new process's global RNG starts elsewhere
    resumed = resume(path)
    train_steps(resumed, 5)

    assert resumed.state.step == straight.state.step == 8
    for name, param in straight.trainable.items():
        assert torch.equal(resumed.trainable[name], param), name
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_checkpoint_files_are_safetensors_json_and_weights_only_pickle(tmp_path):
    toy = make_toy(0)
    train_steps(toy, 2)
    path = save(toy, tmp_path / "checkpoints")
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == sorted(checkpoint.OWN_FILES)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    assert torch.equal(optimizer_state["state"][0]["exp_avg"], toy.optimizer.state[toy.trainable["0.weight"]]["exp_avg"])
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 2 and len(state["python_rng"][1]) == 625
    assert json.loads((path / "scheduler.json").read_text())["last_epoch"] == 2
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["files"]["trainable.safetensors"] == (path / "trainable.safetensors").stat().st_size
    assert checkpoint.checkpoint_size(path) == sum(p.stat().st_size for p in path.iterdir()) > 0


def test_extra_files_are_written_inside_the_checkpoint(tmp_path):
    toy = make_toy(0)
    train_steps(toy, 1)
    path = save(
        toy,
        tmp_path / "checkpoints",
        extra_files={
            "pytorch_lora_weights.safetensors": lambda p: p.write_bytes(b"lora"),
            "style.safetensors": lambda p: p.write_bytes(b"kohya!"),
        },
    )
    assert (path / "pytorch_lora_weights.safetensors").read_bytes() == b"lora"
    assert json.loads((path / "COMPLETE").read_text())["files"]["style.safetensors"] == 6
    with pytest.raises(ValueError, match="state.json"):
        save(toy, tmp_path / "checkpoints", extra_files={"state.json": lambda p: None})


def test_keep_last_k_deletes_the_oldest(tmp_path):
    toy = make_toy(0)
    for _ in range(5):
        train_steps(toy, 1)
        newest = save(toy, tmp_path / "checkpoints", keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path / "checkpoints") == newest


def test_resuming_an_earlier_checkpoint_drops_the_abandoned_later_ones(tmp_path):
    toy = make_toy(0)
    for _ in range(3):
        train_steps(toy, 2)
        save(toy, tmp_path / "checkpoints", keep=5)
    resumed = resume(tmp_path / "checkpoints" / "step-00000002")
    train_steps(resumed, 1)
    new = save(resumed, tmp_path / "checkpoints", keep=5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert find_checkpoint(tmp_path, "latest") == new


def test_latest_skips_incomplete_damaged_and_temporary_folders(tmp_path):
    out = tmp_path / "run"
    checkpoints_dir = out / "checkpoints"
    toy = make_toy(0)
    train_steps(toy, 2)
    save(toy, checkpoints_dir)
    train_steps(toy, 2)
    good = save(toy, checkpoints_dir)
    no_marker = shutil.copytree(good, checkpoints_dir / "step-00000009")
    (no_marker / "COMPLETE").unlink()
    truncated = shutil.copytree(good, checkpoints_dir / "step-00000008")
    (truncated / "trainable.safetensors").write_bytes((truncated / "trainable.safetensors").read_bytes()[:100])
    shutil.copytree(good, checkpoints_dir / f"{TMP_PREFIX}abc123")  # a killed save's leftover, marker and all
    shutil.copytree(good, checkpoints_dir / "step-00000012.bak")

    assert find_checkpoint(out, "latest") == good
    assert find_checkpoint(checkpoints_dir, "latest") == good
    assert find_checkpoint(out, str(good)) == good
    assert find_checkpoint(out, "step-00000002") == checkpoints_dir / "step-00000002"
    with pytest.raises(ValueError, match="step-00000009.*not a complete checkpoint"):
        find_checkpoint(out, str(no_marker))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(truncated, toy.trainable, toy.optimizer, toy.scheduler)
    with pytest.raises(FileNotFoundError, match="step-00000077"):
        find_checkpoint(out, str(checkpoints_dir / "step-00000077"))
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint.*{tmp_path.name}.empty"):
        find_checkpoint(tmp_path / "empty", "latest")


def test_load_names_missing_extra_and_mismatched_keys(tmp_path):
    toy = make_toy(0)
    path = save(toy, tmp_path / "checkpoints")
    other = make_toy(1)
    trainable = dict(other.trainable)
    trainable["2.weight"] = torch.nn.Parameter(torch.zeros(3, 9))
    trainable["extra.weight"] = trainable.pop("2.bias")
    with pytest.raises(
        ValueError, match=r"missing keys \['extra.weight'\]; unexpected keys \['2.bias'\]; shape mismatch for \['2.weight'\]"
    ):
        load_checkpoint(path, trainable, other.optimizer, other.scheduler)


def _replace_file(path: Path, name: str, content: bytes) -> None:
    """A checkpoint file replaced, its COMPLETE marker's size updated so that the folder still counts as complete."""
    (path / name).write_bytes(content)
    marker = json.loads((path / checkpoint.COMPLETE).read_text())
    marker["files"][name] = len(content)
    (path / checkpoint.COMPLETE).write_text(json.dumps(marker))


class _RunsCode:
    """Unpickling this would run a shell command, as a malicious optimizer.pt would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_state_json_without_a_key_is_one_line_naming_checkpoint_and_key(tmp_path):
    path = save(make_toy(0), tmp_path / "checkpoints")
    state = json.loads((path / checkpoint.STATE_FILE).read_text())
    del state["epoch"]
    _replace_file(path, checkpoint.STATE_FILE, json.dumps(state).encode())
    other = make_toy(1)
    with pytest.raises(ValueError, match=rf"{path / 'state.json'} has no 'epoch': the checkpoint {path} is damaged") as caught:
        load_checkpoint(path, other.trainable, other.optimizer, other.scheduler)
    assert "\n" not in str(caught.value)


def test_a_code_running_optimizer_file_is_refused_without_torchs_advice(tmp_path):
    path = save(make_toy(0), tmp_path / "checkpoints")
    evil = io.BytesIO()
    torch.save({"state": _RunsCode(tmp_path / "MARKER"), "param_groups": []}, evil)  # torch's zip format, as a real one
    _replace_file(path, checkpoint.OPTIMIZER_FILE, evil.getvalue())
    other = make_toy(1)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path, other.trainable, other.optimizer, other.scheduler)
    message = str(caught.value)
    assert str(path / "optimizer.pt") in message and "not a plain tensor file" in message and "will not run code" in message
    assert "weights_only" not in message and "\n" not in message and caught.value.__cause__ is None
    assert not (tmp_path / "MARKER").exists()


def test_save_refuses_a_state_without_rngs(tmp_path):
    toy = make_toy(0)
    with pytest.raises(RuntimeError, match="capture_rngs"):
        save_checkpoint(tmp_path, toy.state, toy.trainable, toy.optimizer, toy.scheduler, keep=2)


def _fail_no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "torch.save", "extra file"])
def test_full_disk_during_save_leaves_the_previous_checkpoint_and_can_resume(tmp_path, monkeypatch, where):
    checkpoints_dir = tmp_path / "checkpoints"
    toy = make_toy(0)
    train_steps(toy, 2)
    previous = save(toy, checkpoints_dir, keep=1)
    before = folder_digest(previous)
    train_steps(toy, 2)
    extra = {}
    with monkeypatch.context() as patch:
        if where == "safetensors":
            patch.setattr(checkpoint, "save_file", _fail_no_space)
        elif where == "torch.save":
            patch.setattr(torch, "save", _fail_no_space)
        else:
            extra = {"pytorch_lora_weights.safetensors": _fail_no_space}
        with pytest.raises(OSError, match="no space left.*step-00000004.*step-00000002.*--resume latest") as caught:
            save(toy, checkpoints_dir, keep=1, extra_files=extra)
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in checkpoints_dir.iterdir()] == ["step-00000002"]  # no new folder, no temporary one
    assert folder_digest(previous) == before
    assert find_checkpoint(tmp_path, "latest") == previous

    # space freed: the same run saves again, and a resume from it continues
    new = save(toy, checkpoints_dir, keep=1)
    assert [p.name for p in checkpoints_dir.iterdir()] == ["step-00000004"]
    assert resume(find_checkpoint(tmp_path, "latest")).state.step == 4 and new.name == "step-00000004"


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_toy, save, train_steps
    checkpoints_dir = Path({checkpoints!r})
    toy = make_toy(0)
    train_steps(toy, 2)
    save(toy, checkpoints_dir)
    train_steps(toy, 2)

    def write_slowly(path):
        with open(path, "wb") as handle:
            handle.write(b"half a lora file")
            handle.flush()
            print("writing", flush=True)
            time.sleep(60)

    save(toy, checkpoints_dir, extra_files={{"pytorch_lora_weights.safetensors": write_slowly}})
""")


@pytest.mark.slow  # over a second: subprocesses or several training runs
def test_sigkill_during_a_checkpoint_write_keeps_the_last_complete_one(tmp_path, read_line):
    checkpoints_dir = tmp_path / "checkpoints"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), checkpoints=str(checkpoints_dir))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(process.stdout).strip() == "writing"
    finally:
        process.kill()  # SIGKILL on POSIX: no finally blocks, no cleanup
        process.wait(timeout=30)
        process.stdout.close()
    leftovers = [p.name for p in checkpoints_dir.iterdir() if p.name != "step-00000002"]
    assert len(leftovers) == 1 and leftovers[0].startswith(TMP_PREFIX)  # the killed save's temporary folder only
    survivor = find_checkpoint(tmp_path, "latest")
    assert survivor.name == "step-00000002"
    assert resume(survivor).state.step == 2

    # the next save clears what the killed one left
    toy = resume(survivor)
    train_steps(toy, 1)
    save(toy, checkpoints_dir)
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == ["step-00000002", "step-00000003"]
