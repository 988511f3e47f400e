"""Training metrics: `metrics.jsonl` always (one JSON object per line), experiment trackers through accelerate, a tqdm bar.

The JSONL file is an append-only log, flushed line by line: the local record, written whatever the trackers are.
A run killed mid-write can leave a torn last line: readers skip it and the next logger cuts it off before
appending. On resume, `truncate_after(step)` drops the lines of steps the resumed run will redo, so the log has
each step once, and restarts the trackers, TensorBoard's with `purge_step` so its reader hides those steps' old
events too.

Trackers (`--report-to`) are accelerate's: `tracking_options(report_to, output_dir)` are the `Accelerator`
arguments (`log_with`, and a project configuration that puts TensorBoard's and Aim's files in OUT/logs);
a `MetricsLogger` given that accelerator starts them with `init_trackers`, sends scalars with `accelerator.log`
and finishes them in `close()`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..storage.atomic import atomic_file

if TYPE_CHECKING:
    from PIL import Image

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "logs"  # accelerate's logging_dir: TensorBoard writes OUT/logs/<project>, Aim its repository OUT/logs/.aim
# each tracker --report-to can name: (what to pip install, the sdlora extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet"),
    "mlflow": ("mlflow", "mlflow"),
    "aim": ("aim", "aim"),
}
WANDB_HOST = "api.wandb.ai"


def resolve_trackers(report_to: str | None) -> list[str]:
    """The tracker names `--report-to` means, each installed: None is tensorboard when installed (else none),
    "all" every installed one, "none" no tracker. A named tracker that is not installed is a ValueError."""
    from accelerate.tracking import get_available_trackers  # accelerate imports torch.distributed: only when asked

    installed = {str(kind) for kind in get_available_trackers()}
    if report_to is None:
        return ["tensorboard"] if "tensorboard" in installed else []
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if name in installed]
    if report_to not in TRACKERS:
        raise UserError(f"--report-to {report_to!r} is invalid: it must be one of {', '.join(TRACKERS)}, all or none")
    if report_to not in installed:
        package, extra = TRACKERS[report_to]
        raise UserError(f'--report-to {report_to}: {package} is not installed: pip install "sdlora[{extra}]" (or pip install {package})')
    return [report_to]


def tracking_options(report_to: str | None, output_dir: str | os.PathLike) -> dict[str, Any]:
    """The `Accelerator(...)` keyword arguments for `--report-to`: `log_with` (None when no tracker) and a
    `ProjectConfiguration` with the project in `output_dir` and the trackers' local files in `output_dir/logs`."""
    from accelerate.utils import ProjectConfiguration  # accelerate imports torch.distributed: only when asked

    out = Path(output_dir)
    return {
        "log_with": resolve_trackers(report_to) or None,  # an empty list would make accelerate warn "no trackers installed"
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / TENSORBOARD_DIR)),
    }


def tracker_config(options: dict[str, Any]) -> dict[str, Any]:
    """A run's options as the flat dict every tracker's hyperparameter table takes: None becomes "" (not given),
    lists their JSON text; nested dicts are flattened to `outer.inner` keys."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in tracker_config(value).items()})
        elif value is None:
            flat[key] = ""
        elif isinstance(value, (list, tuple)):
            flat[key] = json.dumps(list(value))
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)
    return flat


def wandb_reachable(timeout: float = 1.0) -> bool:
    """Whether W&B's server (WANDB_BASE_URL, else api.wandb.ai) accepts a TCP connection within `timeout` seconds."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or f"https://{WANDB_HOST}")
    host, port = url.hostname or WANDB_HOST, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def wandb_offline_unless_reachable(output_dir: str | os.PathLike) -> bool:
    """Set WANDB_MODE=offline, saying so in one line, when WANDB_MODE is not set and W&B cannot be reached;
    returns whether it did. The run is kept in output_dir/wandb, for `wandb sync` later."""
    if os.environ.get("WANDB_MODE") or wandb_reachable():
        return False
    os.environ["WANDB_MODE"] = "offline"
    where = Path(output_dir) / "wandb"
    print(f"W&B cannot be reached: logging offline into {where}; upload it later with: wandb sync {where}/offline-run-*")
    return True


class MetricsLogger:
    """Append `{"step", "time", **values}` lines to `output_dir/metrics.jsonl`, and the numeric values to the
    trackers of `accelerator` (built with `tracking_options`; None: the JSONL file only).

    `project` is the name the trackers file the run under, `config` the run's options (their hyperparameters).
    Only the main process logs: the others pass `enabled=False` and write nothing."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        accelerator: Any = None,
        enabled: bool = True,
        project: str = "sdlora",
        config: dict[str, Any] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.enabled = enabled  # False on every process but the main one: they log nothing
        self.accelerator = accelerator
        self.project = project
        self.config = tracker_config(config) if config is not None else None
        self._started = False  # the accelerator's trackers are running
        self._handle: IO[str] | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(self.path)

    @property
    def trackers(self) -> list[str]:
        """The names of the trackers this logger sends to (none when disabled or without an accelerator)."""
        if not self.enabled or self.accelerator is None:
            return []
        return [str(kind) for kind in self.accelerator.log_with]

    def log(self, step: int, **values: float) -> None:
        """Append one line for `step` (flushed at once) and send the numeric values to the trackers."""
        if not self.enabled:
            return
        clean = {name: _plain(value) for name, value in values.items()}
        line = json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}, allow_nan=False)
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        # one write call per line: a kill can tear only the last line, which readers skip
        self._handle.write(line + "\n")
        self._handle.flush()
        numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and self._start_trackers():
            self.accelerator.log(numbers, step=int(step))

    def log_images(self, step: int, images: dict[str, Image.Image]) -> None:
        """Send images (by tag) to each tracker that takes them: TensorBoard, W&B and Aim. accelerate's Comet and
        MLflow trackers have no image logging: they get the scalars only."""
        if not self.enabled or not images or not self._start_trackers():
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                batches = {tag: np.asarray(image.convert("RGB"))[None] for tag, image in images.items()}
                tracker.log_images(batches, step=int(step), dataformats="NHWC")
                tracker.tracker.flush()  # accelerate flushes after scalars, not after images
            elif tracker.name == "wandb":
                tracker.log_images({tag: [image] for tag, image in images.items()}, step=int(step))
            elif tracker.name == "aim":
                tracker.log_images(dict(images), step=int(step))

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` (rewritten atomically), and restart the trackers so that the
        resumed run's steps replace the old ones: TensorBoard's reader drops this run's events after `step`."""
        if not self.enabled:
            return
        self._close_handle()
        if self.path.exists():
            kept = [line for line, row in _parse_lines(self.path, strict=False) if row.get("step", 0) <= step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if self.trackers:
            self._finish_trackers()
            self._start_trackers(purge_step=step + 1)

    def close(self) -> None:
        """Flush and close the log file, and finish the trackers (their files are complete after this)."""
        self._close_handle()
        self._finish_trackers()

    def _start_trackers(self, purge_step: int | None = None) -> bool:
        """Start the accelerator's trackers unless they run; whether there are any. `purge_step`: TensorBoard hides
        the events earlier runs in this folder wrote from that step on."""
        if self._started:
            return True
        if not self.trackers:
            return False
        init_kwargs: dict[str, dict[str, Any]] = {}
        if purge_step is not None:
            init_kwargs["tensorboard"] = {"purge_step": purge_step}
        if "wandb" in self.trackers:
            wandb_offline_unless_reachable(self.output_dir)
            init_kwargs["wandb"] = {"dir": str(self.output_dir), "name": self.output_dir.name}
        self.accelerator.init_trackers(self.project, config=self.config, init_kwargs=init_kwargs)
        self._started = True
        return True

    def _finish_trackers(self) -> None:
        # each tracker's finish, not accelerator.end_training(): that also destroys the process group, which
        # save_outputs still waits on (and a notebook's next train() reuses)
        if not self._started:
            return
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self._started = False

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """A JSON-able scalar: tensors/numpy become Python numbers; NaN and inf become null (strict JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (a kill mid-write) so appending does not glue a new line onto it."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def _parse_lines(path: Path, strict: bool) -> list[tuple[str, dict]]:
    """(line, row) for each JSON-object line; a torn last line is skipped, a bad line elsewhere raises if `strict`."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            parsed.append((line, row))
        elif strict and number < len(lines):
            raise UserError(f"{path}:{number} is not a JSON object line: {line[:60]!r}")
    return parsed


def read_metrics(path: Path, strict: bool = True) -> list[dict]:
    """The rows of a metrics.jsonl file; a torn last line is skipped, a bad line elsewhere is an error if `strict`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    return [row for _, row in _parse_lines(path, strict)]


def progress_bar(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    """A training progress bar (steps, it/s, ETA) that starts at `initial` when resuming."""
    return tqdm(total=total, initial=initial, disable=disable, desc="training", unit="it", dynamic_ncols=True, smoothing=0.1)
