"""The UI's fixtures: a real server on a free port of 127.0.0.1 over a temporary root, and a small HTTP client."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sdlora.ui.server import make_server


class Client:
    """JSON calls to one server, with its CSRF token on every POST; `(status, value)` for each."""

    def __init__(self, base: str, csrf: bool = True) -> None:
        self.base = base
        self.token = self.get("/api/csrf")[1]["token"] if csrf else ""

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body=None) -> tuple[int, dict]:
        return self.request("POST", path, {} if body is None else body, {"X-CSRF-Token": self.token, "Content-Type": "application/json"})

    def raw(self, path: str, headers: dict | None = None) -> tuple[int, bytes, str]:
        """(status, body bytes, content type) of a GET."""
        try:
            with urllib.request.urlopen(urllib.request.Request(self.base + path, headers=headers or {}), timeout=60) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type", "")

    def events(self, job_id: int, timeout: float = 240.0):
        """(event, value) of the job's server-sent events until `end` (included), failing after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with urllib.request.urlopen(f"{self.base}/api/jobs/{job_id}/events", timeout=timeout) as stream:
            name = None
            for raw in stream:
                assert time.monotonic() < deadline, f"job {job_id} did not end within {timeout:g} s"
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    yield name, json.loads(line[len("data: ") :])
                    if name == "end":
                        return

    def wait_for(self, job_id: int, statuses: tuple[str, ...], timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/api/jobs/{job_id}")[1]
            if job["status"] in statuses:
                return job
            time.sleep(0.1)
        pytest.fail(f"job {job_id} is {job['status']} after {timeout:g} s, not {statuses}")


def start_server(root: Path, **options):
    server = make_server(port=0, roots=[str(root)], state_dir=str(root / ".sdlora-ui"), **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


@pytest.fixture
def ui_root(tmp_path, make_dataset):
    """A root folder with a captioned 64 px dataset in data/ and nothing else."""
    root = tmp_path / "root"
    make_dataset(root / "data", count=4)
    return root


@pytest.fixture
def ui(ui_root, monkeypatch):
    """`(server, client)`: a UI on a free port of 127.0.0.1 over `ui_root`, shut down after the test (jobs stopped).
    Its trainings use one CPU thread: on the tiny model that is as fast alone, and 3x faster on a busy machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    server = start_server(ui_root)
    yield server, Client(f"http://127.0.0.1:{server.port}")
    for job in server.runner.store.all(("running", "queued")):
        server.runner.stop(job["id"])
    server.shutdown()
    server.server_close()
    for process in list(server.runner._processes.values()):
        process.wait(timeout=60)


@pytest.fixture
def start_ui():
    """`start_ui(root, **make_server options) -> server` serving in a thread, shut down after the test."""
    started = []

    def start(root: Path, **options):
        started.append(start_server(root, **options))
        return started[-1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def client_for():
    """`client_for(base_url, csrf=True) -> Client`: JSON calls to a UI (with its CSRF token unless `csrf=False`)."""
    return Client
