"""Training jobs through the API: a tiny run (the tiny model, 64 px, a few steps) streamed to its end with its
metrics and samples; one run at a time, stop and resume from the last checkpoint; a failed run's error line; a run
that outlives its UI, and a UI started again on the same state finding its jobs running or how they ended."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdlora.config import load_toml
from sdlora.errors import UserError
from sdlora.storage.steps import step_of
from sdlora.training.checkpoint import latest_checkpoint
from sdlora.training.config import TrainConfig
from sdlora.ui.child import EXIT_FILE
from sdlora.ui.jobs import _SCHEMA, DATABASE, LOG_FILE, OPTIONS_FILE, JobRunner

TINY = {"model": "tiny", "resolution": 64, "rank": 4, "alpha": 8.0, "batch_size": 2, "report_to": "none", "seed": 3}


@pytest.mark.slow
def test_a_tiny_run_streams_its_metrics_and_samples_to_the_end(ui, ui_root):
    server, client = ui
    options = TINY | {"data_dir": "data", "output_dir": "runs/a", "steps": 2, "checkpoint_every": 0, "validate_every": 1, "sample_steps": 1}
    status, answer = client.post("/api/jobs", options)
    assert status == 201
    job_id = answer["id"]
    received, latencies = [], []
    for name, value in client.events(job_id):
        received.append((name, value))
        if name == "metrics":
            latencies.append(time.time() - value["time"])
    assert max(latencies) < 1.0, latencies  # a metrics line reaches the page within a second (the stream looks every 0.25 s)
    out = ui_root / "runs" / "a"
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [value for name, value in received if name == "metrics"] == written  # every line, in order, once
    losses = [(line["step"], line["loss"]) for line in written if "loss" in line]
    assert [step for step, _ in losses] == [1, 2] and all(math.isfinite(loss) for _, loss in losses)
    samples = [value for name, value in received if name == "sample"]
    assert {"step-00000001.png", "step-00000002.png"} <= {sample["name"] for sample in samples}
    for sample in samples:
        status, body, kind = client.raw(sample["url"])
        assert status == 200 and kind == "image/png" and body == (out / "samples" / sample["name"]).read_bytes()
    last = [value for name, value in received if name == "job"][-1]
    assert (last["status"], last["step"], last["steps"], last["loss"], last["error"]) == ("done", 2, 2, losses[-1][1], None)
    assert received[-1] == ("end", {"status": "done"})
    assert (out / "lora.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    listing = client.get("/api/loras?dir=runs/a")[1]
    listed = {entry["name"]: entry for entry in listing["loras"]}
    assert (listed["lora.safetensors"]["rank"], listed["lora.safetensors"]["alpha"]) == (4, 8.0)
    assert listed["lora.safetensors"]["trigger_words"][0] == "flat poster"  # in every caption; the others in one each
    assert "checkpoints/step-00000002/trainable.safetensors" not in listed and listing["other_files"] >= 1
    # the job's options file is what `sdlora train --config` reads: the same run from the shell
    resolved = options | {"data_dir": str(ui_root / "data"), "output_dir": str(out)}
    job_file = server.runner.job_dir(job_id) / OPTIONS_FILE
    assert TrainConfig.from_options(**load_toml(job_file)) == TrainConfig.from_options(**resolved)


def _stop_at(client, job_id: int, step: int, after: float = 0.0) -> dict:
    """Stop the job once its metrics reach `step` in a line written after the time `after`; its state once stopped."""
    for name, value in client.events(job_id):
        if name == "metrics" and value["step"] >= step and value["time"] > after:
            assert client.post(f"/api/jobs/{job_id}/stop")[0] == 200
            break
    return client.wait_for(job_id, ("stopped", "done", "failed"))


@pytest.mark.slow
def test_one_run_at_a_time_stop_resume_from_the_checkpoint_and_a_failed_runs_error_line(ui, ui_root):
    server, client = ui
    (ui_root / "empty").mkdir()
    # long enough never to end here: it is stopped twice
    long_run = TINY | {
        "data_dir": "data",
        "output_dir": "runs/long",
        "steps": 1000,
        "checkpoint_every": 2,
        "validate_every": 0,
        "samples": False,
    }
    long_id = client.post("/api/jobs", long_run)[1]["id"]
    failing_id = client.post("/api/jobs", TINY | {"data_dir": "empty", "output_dir": "runs/empty", "steps": 2})[1]["id"]
    assert client.get(f"/api/jobs/{failing_id}")[1]["status"] == "queued"
    busy = f"--output {ui_root / 'runs' / 'long'} is the output folder of job {long_id} (running): choose another folder"
    assert client.post("/api/jobs", long_run | {"steps": 3}) == (400, {"error": busy})

    stopped = _stop_at(client, long_id, 3)
    stop_time = time.time()
    assert (stopped["status"], stopped["error"], stopped["can_resume"]) == ("stopped", None, True)
    assert (server.runner.job_dir(long_id) / EXIT_FILE).read_text() == "130"  # the trainer's own Ctrl-C exit
    assert "sdlora: interrupted" in (server.runner.job_dir(long_id) / LOG_FILE).read_text()
    checkpoint_step = step_of(latest_checkpoint(ui_root / "runs" / "long" / "checkpoints").name)
    assert checkpoint_step >= 2

    failed = client.wait_for(failing_id, ("done", "failed", "stopped"))  # the queue went on
    assert failed["status"] == "failed" and failed["error"].startswith("sdlora train: error: ") and "empty" in failed["error"]
    assert not failed["can_resume"] and client.post(f"/api/jobs/{failing_id}/resume")[0] == 400

    status, answer = client.post(f"/api/jobs/{long_id}/resume")
    assert status == 200 and answer["status"] in ("queued", "running")
    # until the resumed run has cut the log back to its checkpoint, the stream shows the first run's lines
    assert _stop_at(client, long_id, checkpoint_step + 2, after=stop_time)["status"] == "stopped"
    lines = [json.loads(line) for line in (ui_root / "runs" / "long" / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= checkpoint_step + 2
    # the steps up to the checkpoint are the first run's, the rest the resumed run's
    assert all((line["time"] < stop_time) == (line["step"] <= checkpoint_step) for line in lines if "loss" in line)


def test_a_ui_started_again_finds_how_its_jobs_ended(tmp_path):
    state = tmp_path / "state"
    runner = JobRunner(state)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    ids = []
    for name, exit_code in (("ok", "0"), ("killed", None), ("broken", "2")):
        job_id = runner.store.add({"output_dir": name}, str(tmp_path / name), 10)
        runner.job_dir(job_id).mkdir(parents=True)
        if exit_code is not None:
            (runner.job_dir(job_id) / EXIT_FILE).write_text(exit_code)
        (runner.job_dir(job_id) / LOG_FILE).write_text(
            "training: 10%\rsdlora train: error: no images found in data\n" if name == "broken" else ""
        )
        runner.store.update(job_id, status="running", pid=pid)
        ids.append(job_id)
    with pytest.raises(UserError, match="another sdlora ui uses the jobs"):
        JobRunner(state)  # while the first UI runs: it would start the same queued job twice
    runner.close()
    again = JobRunner(state)
    assert [again.store.get(job_id)["status"] for job_id in ids] == ["done", "failed", "failed"]
    assert again.store.get(ids[1])["error"].startswith("the job's process ended without an exit status")
    assert again.store.get(ids[2])["error"] == "sdlora train: error: no images found in data"


def _start_ui_process(root, read_line, client_for):
    """`sdlora ui` as its own process on a free port of 127.0.0.1 over `root`, and a client of it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "sdlora", "ui", "--port", "0", "--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    line = read_line(process.stdout, timeout=120)
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return process, client_for(f"http://127.0.0.1:{port}")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the training process through /proc")
def test_a_run_outlives_the_ui_and_a_ui_started_again_follows_it_to_its_end(ui_root, read_line, client_for):
    first, client = _start_ui_process(ui_root, read_line, client_for)
    try:
        options = TINY | {
            "data_dir": "data",
            "output_dir": "runs/kept",
            "steps": 1000,
            "checkpoint_every": 2,
            "validate_every": 0,
            "samples": False,
        }
        job_id = client.post("/api/jobs", options)[1]["id"]
        for name, value in client.events(job_id):
            if name == "metrics" and value["step"] >= 3:
                break
    finally:
        first.terminate()
        first.wait(timeout=60)
    seen = json.loads((ui_root / "runs" / "kept" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    second, client = _start_ui_process(ui_root, read_line, client_for)
    try:
        job = client.get(f"/api/jobs/{job_id}")[1]
        assert job["status"] == "running" and job["step"] >= seen  # the run went on without a UI
        for name, value in client.events(job_id):
            if name == "metrics" and value["step"] > job["step"]:  # and the new UI follows it
                break
        (trainer,) = _children(_job_pid(ui_root, job_id))  # the table holds the job's child; the trainer is its child
        os.kill(trainer, signal.SIGKILL)  # the training process dies without a word
        failed = client.wait_for(job_id, ("stopped", "done", "failed"))
        assert failed["status"] == "failed" and failed["error"].startswith("the training process was killed by signal 9 (last output: ")
        assert failed["can_resume"]  # its checkpoints are complete: resume goes on from the last
        killed_at = time.time()
        checkpoint_step = step_of(latest_checkpoint(ui_root / "runs" / "kept" / "checkpoints").name)
        assert client.post(f"/api/jobs/{job_id}/resume")[0] == 200
        assert _stop_at(client, job_id, checkpoint_step + 2, after=killed_at)["status"] == "stopped"
        lines = [json.loads(line) for line in (ui_root / "runs" / "kept" / "metrics.jsonl").read_text().splitlines()]
        steps = [line["step"] for line in lines if "loss" in line]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= checkpoint_step + 2  # on from the checkpoint
    finally:
        second.terminate()
        second.wait(timeout=60)


def _job_pid(root: Path, job_id: int) -> int:
    """The pid of the job's child process, as the UI's table holds it."""
    with sqlite3.connect(root / ".sdlora-ui" / "jobs.sqlite") as database:
        return database.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_a_jobs_table_of_an_earlier_version_gains_the_command_column(tmp_path):
    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True)
    old_schema = _SCHEMA.replace(", command TEXT)", ")")
    assert "command" not in old_schema
    with sqlite3.connect(state / DATABASE) as database:
        database.execute(old_schema)
        database.execute(
            "INSERT INTO jobs (status, options, output_dir, steps, created) VALUES ('done', '{}', ?, 5, 0)", (str(tmp_path / "run"),)
        )
    runner = JobRunner(state)
    try:
        job = runner.describe(1)
        assert (job["command"], job["images"], job["status"]) == ("train", [], "done")  # an earlier job: a training
        assert runner.store.get(1)["command"] is None
    finally:
        runner.close()
