"""metrics.py: JSONL lines, append across runs, truncate on resume, torn last line, TensorBoard, progress bar."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

from sdlora.training.metrics import MetricsLogger, progress_bar, read_metrics

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_log_writes_one_flushed_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, loss=0.5, lr=1e-4)
    # flushed before close: a killed run keeps every finished line
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == 0.5 and first["lr"] == 1e-4 and first["time"] > 1.6e9
    logger.log(2, loss=torch.tensor(0.25), epoch=0, grad_norm=float("nan"))
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[1]["loss"] == 0.25 and rows[1]["epoch"] == 0 and rows[1]["grad_norm"] is None  # strict JSON: no NaN
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_new_logger_appends_instead_of_rewriting(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, loss=1.0)
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, loss=0.9)
    assert [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 0.9]


def test_truncate_after_keeps_earlier_steps_so_a_resumed_log_has_no_duplicates(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, loss=1.0 / step)
    logger.log(4, val_loss=0.3)
    logger.truncate_after(3)  # while the file is open for appending
    logger.log(4, loss=0.2)
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 0.2 and rows[0]["loss"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the atomic rewrite left no temporary file


def test_a_torn_last_line_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(3, loss=0.4)
    logger.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert read_metrics(path)[-1]["loss"] == 0.4


def test_a_damaged_middle_line_is_an_error_but_truncate_after_drops_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)
    assert [row["step"] for row in read_metrics(path, strict=False)] == [1, 2]
    MetricsLogger(tmp_path, tensorboard=False).truncate_after(5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_metrics(tmp_path / "nothing.jsonl")


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "out", enabled=False, tensorboard=True)
    logger.log(1, loss=1.0)
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "out").exists()


class FakeSummaryWriter:
    """Records what MetricsLogger asks of torch's SummaryWriter."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_scalars_go_to_tensorboard_and_resume_purges_later_steps(tmp_path, monkeypatch):
    FakeSummaryWriter.instances = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    logger = MetricsLogger(tmp_path)
    assert logger.uses_tensorboard
    logger.log(1, loss=0.5, lr=1e-4, note="text")
    logger.truncate_after(0)
    logger.log(1, loss=0.4)
    logger.close()
    first, second = FakeSummaryWriter.instances
    assert first.log_dir == str(tmp_path / "logs") and first.closed
    assert first.scalars == [("loss", 0.5, 1), ("lr", 1e-4, 1)]
    assert second.purge_step == 1 and second.scalars == [("loss", 0.4, 1)] and second.closed


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_requested_but_missing_is_a_clear_error(tmp_path):
    assert not MetricsLogger(tmp_path).uses_tensorboard  # None: only if available
    with pytest.raises(ValueError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_event_file_is_created(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, loss=0.5)
    logger.close()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_progress_bar_starts_at_the_resume_step_and_shows_its_postfix(capsys):
    bar = progress_bar(total=10, initial=4, disable=False)
    bar.update(1)
    bar.set_postfix(loss="0.5000", lr="1.00e-04")
    bar.close()
    shown = capsys.readouterr().err
    assert "5/10" in shown and "it/s" in shown and "loss=0.5000" in shown and "lr=1.00e-04" in shown
    assert progress_bar(total=10, initial=4, disable=True).disable
