"""Training jobs that outlive the page and the UI: each is an `sdlora train --config JOB/train.toml` subprocess
(through `child`, which records its exit status), its state a row of a SQLite table beside the jobs' folders.

Jobs start in the order they were queued, `parallel` at a time. A UI started again finds its jobs in the table:
one still running is watched until it ends, one that ended meanwhile gets its status from the exit status the
child wrote. Stop is the trainer's Ctrl-C (the last complete checkpoint stays; after `STOP_GRACE_S` the process
group is killed); resume starts the same options again with `--resume latest`."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from ..errors import UserError
from ..training.checkpoint import latest_checkpoint
from ..training.config import TrainConfig, to_toml
from ..training.metrics import METRICS_FILE
from ..training.validation import SAMPLES_DIR
from .child import EXIT_FILE
from .images import job_images

try:
    import fcntl
except ImportError:  # Windows: no flock, and no second-UI check
    fcntl = None

STATUSES = ("queued", "running", "done", "failed", "stopped")
ACTIVE = ("queued", "running")
OPTIONS_FILE = "train.toml"
LOG_FILE = "log.txt"
DATABASE = "jobs.sqlite"
LOCK_FILE = "ui.lock"  # held while a UI uses the state: two would start the same queued job twice
STOP_GRACE_S = 30.0  # a stop that has not ended the trainer by then kills its process group
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, status TEXT NOT NULL, options TEXT NOT NULL, output_dir TEXT NOT NULL,
    steps INTEGER NOT NULL, created REAL NOT NULL, started REAL, finished REAL, pid INTEGER,
    resume INTEGER NOT NULL DEFAULT 0, stop_requested INTEGER NOT NULL DEFAULT 0, error TEXT, command TEXT)"""
# command: the JSON list of another sdlora command's arguments (grid, generate); NULL for a training job
_TQDM_TOTAL = re.compile(r"(\d+)/(\d+) \[")
_TAIL_BYTES = 65536
_OWN_ERROR = re.compile(r"sdlora [a-z-]+: ")  # the command's own one-line error (sdlora train: ..., sdlora grid: error: ...)
IMAGES_DIR = "images"  # an image job's output folder, inside its job folder


class JobStore:
    """The jobs table (one connection shared by the server's threads, behind a lock)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "command" not in columns:  # a table an earlier version made: its jobs are all trainings
                self._db.execute("ALTER TABLE jobs ADD COLUMN command TEXT")

    def add(self, options: dict[str, Any], output_dir: str, steps: int, command: list[str] | None = None) -> int:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (status, options, output_dir, steps, created, command) VALUES ('queued', ?, ?, ?, ?, ?)",
                (json.dumps(options), output_dir, steps, time.time(), None if command is None else json.dumps(command)),
            )
            return int(cursor.lastrowid)

    def get(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def all(self, status: tuple[str, ...] = STATUSES) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(status))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY id", status).fetchall()
        return [dict(row) for row in rows]

    def update(self, job_id: int, **values: Any) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id))


class JobRunner:
    """Queue, start, watch, stop and resume the jobs kept in `state_dir`."""

    def __init__(self, state_dir: Path, parallel: int = 1) -> None:
        if parallel < 1:
            raise UserError(f"--parallel {parallel} is invalid: it must be at least 1")
        self.state_dir = Path(state_dir)
        (self.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock(self.state_dir / LOCK_FILE)
        self.store = JobStore(self.state_dir / DATABASE)
        self.parallel = parallel
        self._lock = threading.RLock()
        self._processes: dict[int, subprocess.Popen] = {}
        for job in self.store.all(("running",)):
            self._adopt(job)
        self._schedule()

    def close(self) -> None:
        """Let another UI take the state (the jobs go on)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def job_dir(self, job_id: int) -> Path:
        return self.state_dir / "jobs" / str(job_id)

    # ------------------------------------------------------------ queue

    def submit(self, config: TrainConfig, options: dict[str, Any]) -> int:
        """Queue a checked config (`options`: what was submitted, kept to fill the form again); its id."""
        output_dir = str(Path(config.run.output_dir).resolve())
        with self._lock:
            for job in self.store.all(ACTIVE):
                if job["output_dir"] == output_dir:
                    raise UserError(
                        f"--output {output_dir} is the output folder of job {job['id']} ({job['status']}): choose another folder"
                    )
            job_id = self.store.add(options, output_dir, config.optimization.steps)
            folder = self.job_dir(job_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / OPTIONS_FILE).write_text(to_toml(config), encoding="utf-8")
            self._schedule()
        return job_id

    def submit_command(self, args: list[str], options: dict[str, Any]) -> int:
        """Queue another sdlora command (checked `args`, without --out: the job writes into its own `images` folder;
        `options`: what was submitted); its id."""
        with self._lock:
            job_id = self.store.add(options, "", 0, command=args)
            out = self.job_dir(job_id) / IMAGES_DIR
            out.parent.mkdir(parents=True, exist_ok=True)
            self.store.update(job_id, output_dir=str(out))
            self._schedule()
        return job_id

    def _schedule(self) -> None:
        with self._lock:
            running = len(self.store.all(("running",)))
            for job in self.store.all(("queued",))[: max(0, self.parallel - running)]:
                self._start(job)

    def _start(self, job: dict[str, Any]) -> None:
        folder = self.job_dir(job["id"])
        (folder / EXIT_FILE).unlink(missing_ok=True)
        command = [sys.executable, "-m", "sdlora.ui.child", str(folder)]
        if job["command"]:
            command += [*json.loads(job["command"]), "--out", job["output_dir"]]
        else:
            command += ["train", "--config", str(folder / OPTIONS_FILE)] + (["--resume", "latest"] if job["resume"] else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(folder / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._processes[job["id"]] = process
        self.store.update(job["id"], status="running", pid=process.pid, started=time.time(), finished=None, error=None)
        threading.Thread(target=self._watch, args=(job["id"], process.wait), daemon=True).start()

    def _adopt(self, job: dict[str, Any]) -> None:
        """A job a previous UI started: watched while its process lives, finished from its exit file after."""
        pid = job["pid"]
        if pid and _alive(pid, self.job_dir(job["id"])):
            threading.Thread(
                target=self._watch, args=(job["id"], lambda: _wait_for_exit(pid, self.job_dir(job["id"]))), daemon=True
            ).start()
        else:
            self._finish(job["id"])

    def _watch(self, job_id: int, wait) -> None:
        wait()
        with self._lock:
            self._processes.pop(job_id, None)
            self._finish(job_id)
            self._schedule()

    def _finish(self, job_id: int) -> None:
        job = self.store.get(job_id)
        folder = self.job_dir(job_id)
        try:
            code: int | None = int((folder / EXIT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            code = None  # the child itself was killed
        if code == 0:
            status, error = "done", None
        elif job["stop_requested"]:
            status, error = "stopped", None
        else:
            status, error = "failed", _error_line(folder / LOG_FILE, code)
        self.store.update(job_id, status=status, error=error, finished=time.time(), pid=None)

    # ------------------------------------------------------------ stop and resume

    def stop(self, job_id: int) -> None:
        job = self._job(job_id)
        with self._lock:
            if job["status"] == "queued":
                self.store.update(job_id, status="stopped", stop_requested=1, finished=time.time())
                return
            if job["status"] != "running":
                raise UserError(f"job {job_id} is {job['status']}: only a queued or running job can be stopped")
            self.store.update(job_id, stop_requested=1)
            _signal_group(job["pid"], signal.SIGINT)
        timer = threading.Timer(STOP_GRACE_S, self._kill_if_running, args=(job_id, job["pid"]))
        timer.daemon = True  # a UI that quits leaves the job to stop by itself
        timer.start()

    def _kill_if_running(self, job_id: int, pid: int) -> None:
        job = self.store.get(job_id)
        if job and job["status"] == "running" and job["pid"] == pid:
            _signal_group(pid, signal.SIGKILL)

    def resume(self, job_id: int) -> None:
        """Queue a stopped or failed job again, from its last complete checkpoint."""
        job = self._job(job_id)
        with self._lock:
            if job["command"]:
                raise UserError(f"job {job_id} is sdlora {json.loads(job['command'])[0]}: only a training can be resumed")
            if job["status"] not in ("stopped", "failed"):
                raise UserError(f"job {job_id} is {job['status']}: only a stopped or failed job can be resumed")
            if self.checkpoint(job) is None:
                raise UserError(
                    f"job {job_id} has no complete checkpoint in {job['output_dir']}/checkpoints to resume from: start it again instead"
                )
            self.store.update(job_id, status="queued", resume=1, stop_requested=0, error=None, finished=None)
            self._schedule()

    @staticmethod
    def checkpoint(job: dict[str, Any]) -> Path | None:
        return None if job["command"] else latest_checkpoint(Path(job["output_dir"]) / "checkpoints")

    def _job(self, job_id: int) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None:
            raise FileNotFoundError(f"no job {job_id}")
        return job

    # ------------------------------------------------------------ what the page shows

    def describe(self, job_id: int) -> dict[str, Any]:
        """A job as the API answers it: status, step of steps, last loss, output folder, error line, samples."""
        job = self._job(job_id)
        out = Path(job["output_dir"])
        lines = read_metrics(out / METRICS_FILE, tail=True)
        losses = [line for line in lines if "loss" in line]
        step = max((line["step"] for line in lines), default=0)
        return {
            "id": job["id"],
            "status": job["status"],
            "step": step,
            "steps": self._total_steps(job),
            "loss": losses[-1]["loss"] if losses else None,
            "output_dir": job["output_dir"],
            "error": job["error"],
            "created": job["created"],
            "started": job["started"],
            "finished": job["finished"],
            "options": json.loads(job["options"]),
            "samples": sample_names(out),
            "can_resume": job["status"] in ("stopped", "failed") and self.checkpoint(job) is not None,
            "command": json.loads(job["command"])[0] if job["command"] else "train",
            "images": job_images(out) if job["command"] else [],
        }

    def _total_steps(self, job: dict[str, Any]) -> int:
        """The run's steps: --steps, or (with --epochs) the total the trainer's bar shows."""
        if json.loads(job["options"]).get("epochs") is None:
            return job["steps"]
        totals = _TQDM_TOTAL.findall(_tail(self.job_dir(job["id"]) / LOG_FILE))
        return int(totals[-1][1]) if totals else job["steps"]

    def log_tail(self, job_id: int, lines: int = 40) -> list[str]:
        self._job(job_id)
        return _log_lines(self.job_dir(job_id) / LOG_FILE)[-lines:]


def read_metrics(path: Path, offset: int = 0, tail: bool = False) -> list[dict[str, Any]]:
    """metrics.jsonl's complete lines from byte `offset` (or its last 64 KiB with `tail`); a torn line is skipped."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(offset, size - _TAIL_BYTES) if tail else offset)
            data = handle.read()
    except FileNotFoundError:
        return []
    return read_metrics_bytes(data)


def sample_names(out: Path) -> list[str]:
    """The run's sample images (OUT/samples), oldest step first."""
    folder = out / SAMPLES_DIR
    return sorted(path.name for path in folder.glob("*.png")) if folder.is_dir() else []


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - _TAIL_BYTES))
            return handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _log_lines(path: Path) -> list[str]:
    """The log's lines, each tqdm redraw (after a carriage return) a line of its own."""
    return [line.strip() for line in re.split(r"[\r\n]+", _tail(path)) if line.strip()]


def _error_line(log: Path, code: int | None) -> str:
    """The line that says why a job failed: the trainer's own error line, else what ended it, with the log's last line."""
    lines = _log_lines(log)
    own = [line for line in lines if _OWN_ERROR.match(line)]
    if own:
        return own[-1]
    last = f" (last output: {lines[-1]})" if lines else ""
    if code is None:
        return f"the job's process ended without an exit status (killed?){last}"
    if code < 0:
        return f"the training process was killed by signal {-code}{last}"
    return f"the training process exited with status {code}{last}"


def _lock(path: Path) -> IO[str] | None:
    """An exclusive lock on `path` for as long as the returned file is open (None where the system has no flock)."""
    if fcntl is None:
        return None
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(
            f"another sdlora ui uses the jobs in {path.parent}: stop it, or give this one another --state (or --root)"
        ) from None
    return handle


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int, job_dir: Path) -> bool:
    """Whether `pid` is still this job's child (not a process that reused the number, where /proc tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return str(job_dir).encode() in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _wait_for_exit(pid: int, job_dir: Path) -> None:
    while _alive(pid, job_dir):
        time.sleep(0.5)


def read_new_metrics(path: Path, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
    """The records of the complete lines written since byte `offset`, the offset after them, and whether the file
    was cut shorter meanwhile (a resume drops the steps it redoes: the reader starts again from 0)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0, offset > 0
    reset = size < offset
    start = 0 if reset else offset
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(size - start)
    end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
    return read_metrics_bytes(data[:end]), start + end, reset


def read_metrics_bytes(data: bytes) -> list[dict[str, Any]]:
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
