"""metrics.py: JSONL lines, append across runs, truncate on resume, torn last line; trackers through accelerate
(TensorBoard's event files read back with TensorBoard's own reader, resume purges, missing trackers, W&B offline)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import PurePosixPath

import pytest
import torch
from PIL import Image

from sdlora.training import metrics
from sdlora.training.config import TrainConfig
from sdlora.training.metrics import MetricsLogger, progress_bar, read_metrics, resolve_trackers, tracking_options

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (the test extra has it)")


@pytest.fixture
def tracked_accelerator(monkeypatch):
    """`tracked_accelerator(out, report_to) -> Accelerator` built as the recipe builds it (fresh accelerate state)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # TensorBoard sorts a folder's event files by name: time in whole seconds, then a per-process counter. Two
    # writers opened in the same second by one process order wrongly once that counter passes 9 (".10" < ".9"),
    # which only a test's quick second run meets (a resumed run is a new process, seconds later): start it at 0.
    if HAS_TENSORBOARD:
        from tensorboard.summary.writer import event_file_writer

        monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))

    def build(out, report_to):
        AcceleratorState._reset_state()
        return Accelerator(**tracking_options(report_to, out))

    return build


def read_tensorboard(folder):
    """(scalars {tag: [(step, value)]}, images {tag: [(step, width, height)]}) as TensorBoard's reader shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    reader.Reload()
    tags = reader.Tags()
    scalars = {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in reader.Images(tag)] for tag in tags["images"]}
    return scalars, images


def only_tensorboard_installed(monkeypatch):
    """Make accelerate see tensorboard as the one installed tracker, whatever this machine has."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])


def test_log_writes_one_flushed_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path)
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
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, loss=1.0)
    with MetricsLogger(tmp_path) as logger:
        logger.log(2, loss=0.9)
    assert [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 0.9]


def test_truncate_after_keeps_earlier_steps_so_a_resumed_log_has_no_duplicates(tmp_path):
    logger = MetricsLogger(tmp_path)
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
    logger = MetricsLogger(tmp_path)
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
    MetricsLogger(tmp_path).truncate_after(5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_metrics(tmp_path / "nothing.jsonl")


@needs_tensorboard
def test_a_disabled_logger_writes_nothing(tmp_path, tracked_accelerator):
    logger = MetricsLogger(tmp_path / "out", tracked_accelerator(tmp_path / "out", "tensorboard"), enabled=False)
    assert logger.trackers == []
    logger.log(1, loss=1.0)
    logger.log_images(1, {"samples": Image.new("RGB", (8, 8))})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "out").exists()


@needs_tensorboard
def test_tensorboard_reader_sees_the_scalars_of_metrics_jsonl_and_the_image(tmp_path, tracked_accelerator):
    logger = MetricsLogger(tmp_path, tracked_accelerator(tmp_path, "tensorboard"), config={"rank": 4, "resume": None})
    assert logger.trackers == ["tensorboard"]
    logger.truncate_after(-1)  # as a fresh run starts
    for step in (1, 2, 3):
        logger.log(step, loss=1.0 / step, lr=1e-4 * step, grad_norm=torch.tensor(0.5 + step), epoch=0, note="text")
    logger.log(2, val_loss=float("nan"))  # null in the JSONL file, nothing in TensorBoard
    grid = Image.new("RGB", (24, 16), (200, 10, 10))
    logger.log_images(3, {"samples": grid})
    logger.close()
    scalars, images = read_tensorboard(tmp_path / "logs" / "sdlora")
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if "loss" in row]
    for tag in ("loss", "lr", "grad_norm", "epoch"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([row[tag] for row in rows], rel=1e-6), tag
    assert "val_loss" not in scalars and "note" not in scalars
    assert images == {"samples": [(3, 24, 16)]}
    # the run's options, tracker-safe (None as ""), are the hyperparameters accelerate stores beside the events
    stored = [path.read_text() for path in (tmp_path / "logs" / "sdlora").glob("*/hparams.yml")]
    assert stored and "rank: 4" in stored[0] and "resume: ''" in stored[0]


@needs_tensorboard
def test_resume_purges_the_redone_steps_from_tensorboard(tmp_path, tracked_accelerator):
    first = MetricsLogger(tmp_path, tracked_accelerator(tmp_path, "tensorboard"))
    first.truncate_after(-1)
    for step in range(1, 6):
        first.log(step, loss=float(step))
        if step % 2 == 0:
            first.log(step, val_loss=step / 10)
            first.log_images(step, {"samples": Image.new("RGB", (8, 8), (step * 40, 0, 0))})
    first.close()
    resumed = MetricsLogger(tmp_path, tracked_accelerator(tmp_path, "tensorboard"))
    resumed.truncate_after(3)  # as resuming the step-3 checkpoint does
    for step in (4, 5):
        resumed.log(step, loss=10.0 * step)
    resumed.close()
    scalars, images = read_tensorboard(tmp_path / "logs" / "sdlora")
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    # tags the resumed run has not logged again lose their later steps too: TensorBoard's own out-of-order
    # check would drop only the re-logged tags' steps; purge_step drops every tag's
    assert scalars["val_loss"] == [(2, pytest.approx(0.2))]
    assert images.get("samples") == [(2, 8, 8)]
    assert [row.get("loss") for row in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, None, 3.0, 40.0, 50.0]


@pytest.mark.slow  # a real training run
@needs_tensorboard
def test_a_training_run_reports_to_tensorboard(dataset, tmp_path, tiny_config):
    from sdlora.training.recipe import train

    out = tmp_path / "run"
    train(tiny_config(dataset, out, steps=3, checkpoint_every=0, report_to="tensorboard", tracker_project="style"))
    scalars, images = read_tensorboard(out / "logs" / "style")
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    for tag in ("loss", "lr", "grad_norm"):
        assert scalars[tag] == [(row["step"], pytest.approx(row[tag], rel=1e-6)) for row in rows], tag
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    with Image.open(out / "samples" / "step-00000003.png") as grid:  # the final validation's sample grid
        assert images["samples"] == [(3, *grid.size)]


@pytest.mark.parametrize("tracker", ["wandb", "comet_ml", "mlflow", "aim"])
def test_a_chosen_tracker_that_is_not_installed_is_a_one_line_error(tracker, monkeypatch):
    only_tensorboard_installed(monkeypatch)
    with pytest.raises(ValueError, match=r"^--report-to " + tracker + r": .* is not installed: pip install") as info:
        resolve_trackers(tracker)
    assert "\n" not in str(info.value)
    assert resolve_trackers("all") == ["tensorboard"]


def test_a_missing_tracker_stops_training_before_anything_is_made(dataset, tmp_path, tiny_config, monkeypatch):
    from sdlora.training.recipe import train

    only_tensorboard_installed(monkeypatch)
    with pytest.raises(ValueError, match=r'--report-to wandb: wandb is not installed: pip install "sdlora\[wandb\]"'):
        train(tiny_config(dataset, tmp_path / "run", report_to="wandb"))
    assert not (tmp_path / "run").exists()


def test_the_default_is_tensorboard_when_installed_else_only_the_jsonl(monkeypatch):
    import accelerate.tracking

    assert resolve_trackers(None) == (["tensorboard"] if HAS_TENSORBOARD else [])
    assert resolve_trackers("none") == []
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    assert resolve_trackers(None) == [] and resolve_trackers("all") == []
    only_tensorboard_installed(monkeypatch)
    assert resolve_trackers(None) == ["tensorboard"]


def test_report_to_none_writes_no_logs_folder(tmp_path, tracked_accelerator):
    accelerator = tracked_accelerator(tmp_path, "none")
    assert accelerator.log_with == []
    with MetricsLogger(tmp_path, accelerator) as logger:
        logger.truncate_after(-1)
        logger.log(1, loss=0.5)
        logger.log_images(1, {"samples": Image.new("RGB", (8, 8))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_report_to_is_checked_with_the_config(tmp_path):
    options = dict(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"))
    with pytest.raises(
        ValueError, match=r"^--report-to 'bogus' is invalid: it must be one of tensorboard, wandb, comet_ml, mlflow, aim, all, none$"
    ):
        TrainConfig.from_options(**options, report_to="bogus")
    with pytest.raises(ValueError, match="--tracker-project"):
        TrainConfig.from_options(**options, tracker_project=" ")
    assert (
        TrainConfig.from_options(**options, report_to="all").logging.report_to == "all"
        and TrainConfig.from_options(**options).logging.report_to is None
    )


def test_tracker_config_is_flat_and_tracker_safe():
    options = {"rank": 4, "lr": 1e-4, "flip": True, "resume": None, "prompts": ["a", "b, c"], "path": PurePosixPath("/x")}
    flat = metrics.tracker_config(options)
    assert flat == {"rank": 4, "lr": 1e-4, "flip": True, "resume": "", "prompts": '["a", "b, c"]', "path": "/x"}


class RefusingSocket:
    """socket.create_connection that records its arguments and fails as an unreachable host does."""

    def __init__(self):
        self.calls = []

    def __call__(self, address, timeout=None):
        self.calls.append((address, timeout))
        raise OSError("network is unreachable")


def test_wandb_goes_offline_when_its_server_cannot_be_reached(tmp_path, monkeypatch, capsys):
    refusing = RefusingSocket()
    monkeypatch.setattr(socket, "create_connection", refusing)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not metrics.wandb_offline_unless_reachable(tmp_path)  # a mode the user set is kept
    assert os.environ["WANDB_MODE"] == "online" and refusing.calls == []
    monkeypatch.delenv("WANDB_MODE")
    assert metrics.wandb_offline_unless_reachable(tmp_path)
    assert os.environ["WANDB_MODE"] == "offline"
    assert refusing.calls == [(("api.wandb.ai", 443), 1.0)]
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "offline" in said[0] and f"wandb sync {tmp_path / 'wandb'}" in said[0]


def test_wandb_stays_online_when_its_server_answers(monkeypatch):
    class Connection:
        def close(self):
            pass

    calls = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: calls.append(address) or Connection())
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.local:8080")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not metrics.wandb_offline_unless_reachable("out")
    assert "WANDB_MODE" not in os.environ and calls == [("wandb.local", 8080)]


@pytest.mark.slow  # wandb starts a service process
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_is_kept_in_the_output_folder(tmp_path, tracked_accelerator, monkeypatch):
    monkeypatch.setattr(metrics, "wandb_reachable", lambda timeout=1.0: False)
    monkeypatch.setenv("WANDB_MODE", "")  # not set; restored after the test
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    logger = MetricsLogger(tmp_path / "out", tracked_accelerator(tmp_path / "out", "wandb"), config={"rank": 4})
    logger.truncate_after(-1)
    for step in (1, 2):
        logger.log(step, loss=1.0 / step)
    logger.log_images(2, {"samples": Image.new("RGB", (16, 8), (0, 200, 0))})
    logger.close()
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(runs[0].glob("files/media/images/samples_2_*.png"))


def test_progress_bar_starts_at_the_resume_step_and_shows_its_postfix(capsys):
    bar = progress_bar(total=10, initial=4, disable=False)
    bar.update(1)
    bar.set_postfix(loss="0.5000", lr="1.00e-04")
    bar.close()
    shown = capsys.readouterr().err
    assert "5/10" in shown and "it/s" in shown and "loss=0.5000" in shown and "lr=1.00e-04" in shown
    assert progress_bar(total=10, initial=4, disable=True).disable
