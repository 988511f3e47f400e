"""Resumable training checkpoints: `OUT_DIR/checkpoints/step-00000500/`, written atomically, the last K kept.

A checkpoint folder holds `trainable.safetensors` (trainable tensors by name), `optimizer.pt` (loads with
`torch.load(weights_only=True)`), `scheduler.json`, `state.json` (step, data position, Python RNG, extra),
`rng.safetensors` (torch generator states), `scaler.json` (fp16's GradScaler: its loss scale and growth
count; absent without one, and in checkpoints written before it was saved), any extra files the trainer adds, and a `COMPLETE` marker listing
every file's size, written last. The folder is built under a temporary name and renamed into place, so a crash
or a full disk leaves the previous checkpoints untouched and never a folder that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..storage.atomic import TMP_PREFIX, atomic_dir, remove_leftover_temporaries
from ..storage.steps import step_dir_name, step_of

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
LORA_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "state.json"
RNG_FILE = "rng.safetensors"
SCALER_FILE = "scaler.json"
OWN_FILES = (LORA_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE, RNG_FILE, COMPLETE)  # in every checkpoint
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # EDQUOT: over quota, same remedy


class DiskFullError(OSError):
    """A full disk, already explained: what was (not) written, the last complete checkpoint, what to do."""


@dataclass
class TrainState:
    """Where training stands: step, position in the seeded data order, and every RNG the loop draws from."""

    step: int
    epoch: int
    batch_in_epoch: int
    python_rng: object = None  # random.Random.getstate(): flips, crops, caption dropout, shuffling
    torch_rng: torch.Tensor | None = None  # the loop's torch.Generator: noise, timesteps, latent samples
    global_torch_rng: torch.Tensor | None = None  # torch's default CPU generator: LoRA dropout, anything unseeded
    extra: dict = field(default_factory=dict)  # JSON-able values the trainer wants back (e.g. a config digest)
    cuda_rng: torch.Tensor | None = None  # the current GPU's default generator: LoRA dropout on GPU
    skipped_steps: int = 0  # optimizer steps fp16's GradScaler skipped (gradient overflow), so far

    def capture_rngs(self, python_rng: random.Random, torch_generator: torch.Generator) -> None:
        """Record the current state of the loop's RNGs and torch's global ones (call right before saving)."""
        self.python_rng = python_rng.getstate()
        self.torch_rng = torch_generator.get_state()
        self.global_torch_rng = torch.get_rng_state()
        # the current device only: each process trains on one GPU, and asking others would start CUDA on them
        self.cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def restore_rngs(state: TrainState, python_rng: random.Random, torch_generator: torch.Generator) -> None:
    """Put the loop's RNGs and torch's global ones back to the states recorded in `state`."""
    python_rng.setstate(state.python_rng)
    torch_generator.set_state(state.torch_rng)
    torch.set_rng_state(state.global_torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available():  # a GPU checkpoint resumed on CPU has no use for it
        torch.cuda.set_rng_state(state.cuda_rng)


# ---------------------------------------------------------------- save


def save_checkpoint(
    checkpoints_dir: Path,
    state: TrainState,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    keep: int,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    scaler=None,
) -> Path:
    """Write `checkpoints_dir/step-{step:08d}/` atomically, then delete older checkpoints beyond `keep`; `scaler`: a
    GradScaler (fp16), whose state goes in too."""
    if state.python_rng is None or state.torch_rng is None or state.global_torch_rng is None:
        raise RuntimeError("TrainState has no RNG states: call state.capture_rngs(...) before save_checkpoint")
    if keep < 1:
        raise UserError(f"keep_checkpoints must be at least 1, got {keep}")
    for name in extra_files or {}:
        if name in (*OWN_FILES, SCALER_FILE) or Path(name).name != name or name.startswith("."):
            raise UserError(f"extra checkpoint file name {name!r} must be a plain file name other than {', '.join(OWN_FILES)}")
    checkpoints_dir = Path(checkpoints_dir)
    target = checkpoints_dir / step_dir_name(state.step)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_leftover_temporaries(checkpoints_dir)  # what a killed save left behind
    try:
        with atomic_dir(target) as tmp:
            _write_contents(tmp, state, trainable, optimizer, lr_scheduler, extra_files or {}, scaler)
        _fsync_dir(checkpoints_dir)
    except OSError as err:
        if err.errno in DISK_FULL:
            last = latest_checkpoint(checkpoints_dir)
            kept = f"the last complete one is {last}" if last else "no earlier checkpoint exists"
            raise DiskFullError(
                err.errno,
                f"no space left on device while writing checkpoint {target} (nothing was written; {kept}): free space, then resume with --resume latest",
            ) from err
        raise
    _prune(checkpoints_dir, target, state.step, keep)
    return target


def _write_contents(
    folder: Path,
    state: TrainState,
    trainable: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    extra_files: dict[str, Callable[[Path], None]],
    scaler=None,
) -> None:
    # clone: safetensors refuses tensors that share memory, and it wants contiguous CPU data
    save_file({name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in trainable.items()}, str(folder / LORA_FILE))
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    _write_json(folder / SCHEDULER_FILE, lr_scheduler.state_dict(), "lr scheduler state")
    _write_json(folder / STATE_FILE, _state_json(state), "training state")
    scaler_state = scaler.state_dict() if scaler is not None else {}
    if scaler_state:  # a disabled scaler's is empty
        _write_json(folder / SCALER_FILE, scaler_state, "GradScaler state")
    rngs = {"torch_rng": state.torch_rng, "global_torch_rng": state.global_torch_rng}
    if state.cuda_rng is not None:
        rngs["cuda_rng"] = state.cuda_rng
    save_file({name: rng.detach().cpu().contiguous() for name, rng in rngs.items()}, str(folder / RNG_FILE))
    for name, write in extra_files.items():
        write(folder / name)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    for name in files:  # on disk before the marker: a power cut must not leave a marked folder of empty files
        _fsync_file(folder / name)
    _fsync_dir(folder)
    # written last: its presence (with matching sizes) is what makes the folder a checkpoint
    _write_json(folder / COMPLETE, {"format_version": FORMAT_VERSION, "step": state.step, "files": files}, "marker")
    _fsync_file(folder / COMPLETE)


def _state_json(state: TrainState) -> dict:
    version, internal, gauss_next = state.python_rng
    return {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "python_rng": [version, list(internal), gauss_next],
        "extra": state.extra,
        "skipped_steps": state.skipped_steps,
    }


def _write_json(path: Path, value: object, what: str) -> None:
    try:
        text = json.dumps(value, indent=1)
    except TypeError as err:
        raise UserError(f"cannot write {path.name}: the {what} is not JSON-able ({err})") from err
    path.write_text(text, encoding="utf-8")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable; not every platform can open a folder for this."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _prune(checkpoints_dir: Path, new: Path, new_step: int, keep: int) -> None:
    """Keep `new` and the `keep - 1` newest complete checkpoints before it; delete the rest, oldest first.

    Checkpoints with a higher step than `new` are from a timeline this run left by resuming an earlier one:
    `latest` would jump back to them, so they go too.
    """
    others = sorted(((step, path) for step, path in _step_dirs(checkpoints_dir) if path != new), reverse=True)
    kept = 0
    doomed = []
    for step, path in others:
        if step < new_step and kept < keep - 1 and is_complete(path):
            kept += 1
        else:
            doomed.append((step, path))
    for _, path in sorted(doomed):
        # moved away first, so a crash mid-delete never leaves a step-* folder with some files gone
        trash = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "delete-", dir=checkpoints_dir))
        os.replace(path, trash / path.name)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- find and load


def _step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        step = step_of(path.name)
        if step is not None and path.is_dir():
            found.append((step, path))
    return sorted(found)


def is_complete(path: Path) -> bool:
    """True when `path` has a COMPLETE marker and every file it lists exists with the recorded size."""
    try:
        marker = json.loads((Path(path) / COMPLETE).read_text(encoding="utf-8"))
        files = marker["files"]
        return all((Path(path) / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in `checkpoints_dir`, or None."""
    for _, path in reversed(_step_dirs(Path(checkpoints_dir))):
        if is_complete(path):
            return path
    return None


def find_checkpoint(output_dir_or_checkpoints_dir: Path, resume: str) -> Path:
    """The checkpoint `resume` names: 'latest' (highest complete step) or a checkpoint folder's path."""
    base = Path(output_dir_or_checkpoints_dir)
    checkpoints_dir = base / "checkpoints" if (base / "checkpoints").is_dir() else base
    if resume == "latest":
        found = latest_checkpoint(checkpoints_dir)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint to resume from in {checkpoints_dir}")
        return found
    path = Path(resume).expanduser()
    if not path.exists() and (checkpoints_dir / resume).exists():
        path = checkpoints_dir / resume  # a bare `step-00000500` means one in this run's checkpoints
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not is_complete(path):
        raise UserError(
            f"{path} is not a complete checkpoint (missing or mismatched {COMPLETE} marker): pass a step-* folder or --resume latest"
        )
    return path


def load_checkpoint(
    path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, lr_scheduler, scaler=None
) -> TrainState:
    """Copy a checkpoint's LoRA weights into `trainable` and restore optimizer, scheduler and (fp16) GradScaler; returns
    its TrainState. A checkpoint without scaler state (fp32/bf16, or older) leaves `scaler` as it starts."""
    path = Path(path)
    if not is_complete(path):
        raise UserError(f"{path} is not a complete checkpoint (missing or mismatched {COMPLETE} marker)")
    _load_params(path / LORA_FILE, trainable)
    try:
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(optimizer_state)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ValueError... for bad or foreign files
        if "weights only load failed" in str(err).lower():
            # torch's own message advises weights_only=False: the one thing never to do with a file of unknown origin
            raise UserError(
                f"{path / OPTIMIZER_FILE} is not a plain tensor file: it holds Python objects that could run code, and "
                "sdlora will not run code from a checkpoint; resume from another checkpoint or start again"
            ) from None
        raise UserError(
            f"cannot restore the optimizer from {path / OPTIMIZER_FILE} ({_first_line(err)}): was it saved with other settings?"
        ) from err
    lr_scheduler.load_state_dict(_read_json(path / SCHEDULER_FILE))
    if scaler is not None and (path / SCALER_FILE).is_file():
        try:
            scaler.load_state_dict(_read_json(path / SCALER_FILE))
        except (KeyError, TypeError, RuntimeError) as err:
            raise UserError(
                f"{path / SCALER_FILE} is not a GradScaler state ({_first_line(err)}): the checkpoint {path} is damaged"
            ) from None
    return _read_state(path)


def _load_params(file: Path, trainable: dict[str, torch.nn.Parameter]) -> None:
    saved = load_file(str(file))
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    mismatched = sorted(name for name in set(saved) & set(trainable) if saved[name].shape != trainable[name].shape)
    problems = [
        f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
        for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch for", mismatched))
        if names
    ]
    if problems:
        raise UserError(f"{file} does not match the model being trained: {'; '.join(problems)} (other rank, targets or model?)")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint file {path} ({_first_line(err)})") from err


def _read_state(path: Path) -> TrainState:
    raw = _read_json(path / STATE_FILE)
    if not isinstance(raw, dict):
        raise UserError(f"{path / STATE_FILE} is not a JSON object: the checkpoint {path} is damaged; resume from another")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path / STATE_FILE} was written by a newer sdlora (format {raw['format_version']}); upgrade to resume it")
    try:
        rngs = load_file(str(path / RNG_FILE))
    except Exception as err:  # SafetensorError, OSError: a missing, truncated or foreign file
        raise UserError(f"cannot read checkpoint file {path / RNG_FILE} ({_first_line(err)}); resume from another checkpoint") from None
    for file, values, keys in (
        (STATE_FILE, raw, ("step", "epoch", "batch_in_epoch", "python_rng")),
        (RNG_FILE, rngs, ("torch_rng", "global_torch_rng")),
    ):
        missing = [key for key in keys if key not in values]
        if missing:
            raise UserError(f"{path / file} has no {missing[0]!r}: the checkpoint {path} is damaged or not sdlora's; resume from another")
    try:
        version, internal, gauss_next = raw["python_rng"]
        return TrainState(
            step=int(raw["step"]),
            epoch=int(raw["epoch"]),
            batch_in_epoch=int(raw["batch_in_epoch"]),
            python_rng=(version, tuple(internal), gauss_next),
            torch_rng=rngs["torch_rng"],
            global_torch_rng=rngs["global_torch_rng"],
            extra=raw.get("extra", {}),
            cuda_rng=rngs.get("cuda_rng"),
            skipped_steps=int(raw.get("skipped_steps", 0)),
        )
    except (TypeError, ValueError) as err:
        raise UserError(
            f"{path / STATE_FILE} holds a value of the wrong kind ({_first_line(err)}): the checkpoint {path} is damaged"
        ) from None


def checkpoint_size(path: Path) -> int:
    """Bytes on disk of a checkpoint folder (or of every checkpoint under a checkpoints folder)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
