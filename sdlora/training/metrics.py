"""Training metrics: `metrics.jsonl` always (one JSON object per line), TensorBoard when installed, a tqdm bar.

The JSONL file is an append-only log, flushed line by line. A run killed mid-write can leave a torn last line:
readers skip it and the next logger cuts it off before appending. On resume, `truncate_after(step)` drops the
lines of steps the resumed run will redo, so the log has each step once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from ..storage.atomic import atomic_file

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "logs"


def _summary_writer_class(tensorboard: bool | None) -> Any:
    """torch's SummaryWriter, or None when TensorBoard is off or (for `None`, "if available") not installed."""
    if tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra
    except ImportError as err:
        if tensorboard:
            raise ValueError(f"TensorBoard logging was requested but cannot be used ({err}): pip install tensorboard") from err
        return None
    return SummaryWriter


class MetricsLogger:
    """Append `{"step", "time", **values}` lines to `output_dir/metrics.jsonl`, and scalars to TensorBoard."""

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.tensorboard_dir = Path(output_dir) / TENSORBOARD_DIR
        self.enabled = enabled  # False on every process but the main one: they log nothing
        self._writer_class = _summary_writer_class(tensorboard) if enabled else None
        self._writer: Any = None
        self._handle: IO[str] | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(self.path)

    @property
    def uses_tensorboard(self) -> bool:
        return self._writer_class is not None

    def log(self, step: int, **values: float) -> None:
        """Append one line for `step` (flushed at once) and the numeric values to TensorBoard."""
        if not self.enabled:
            return
        clean = {name: _plain(value) for name, value in values.items()}
        line = json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}, allow_nan=False)
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        # one write call per line: a kill can tear only the last line, which readers skip
        self._handle.write(line + "\n")
        self._handle.flush()
        if self._writer_class is not None:
            if self._writer is None:
                self._writer = self._writer_class(log_dir=str(self.tensorboard_dir))
            for name, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(name, value, int(step))

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` (rewritten atomically); TensorBoard drops later events too."""
        if not self.enabled:
            return
        self._close_handle()
        if self.path.exists():
            kept = [line for line, row in _parse_lines(self.path, strict=False) if row.get("step", 0) <= step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if self._writer_class is not None:
            if self._writer is not None:
                self._writer.close()
            # purge_step: TensorBoard hides this run's earlier events from step+1 on, as the resumed run rewrites them
            self._writer = self._writer_class(log_dir=str(self.tensorboard_dir), purge_step=step + 1)

    def close(self) -> None:
        """Flush and close the log file and the TensorBoard writer."""
        self._close_handle()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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
            raise ValueError(f"{path}:{number} is not a JSON object line: {line[:60]!r}")
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
