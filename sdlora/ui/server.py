"""The HTTP server of `sdlora ui`: the page's files and the `/api` calls, on the standard library's
ThreadingHTTPServer (no web framework: nothing to install, nothing that breaks when one updates; a job that must
outlive the page is a subprocess with its state in SQLite, which needs no async server).

Safe by default: bound to 127.0.0.1 and answering only requests addressed to it (a DNS-rebinding page cannot
reach it by another host name); another address needs `--auth USER:PASS` (HTTP basic auth on every request); every
POST and PUT carries the token of `GET /api/csrf` in `X-CSRF-Token`; request bodies are at most `MAX_BODY` bytes; every
path a request names is resolved under the roots (403 otherwise, nothing read); no value reaches a shell."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import mimetypes
import re
import secrets
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..core.version import __version__
from ..errors import UserError
from ..training.metrics import METRICS_FILE
from ..training.validation import SAMPLES_DIR
from .datasets import SizeCache, describe_dataset, write_caption
from .images import generate_command, grid_command
from .jobs import ACTIVE, JobRunner, read_new_metrics, sample_names
from .options import OptionError, check_options, model_defaults, option_schema
from .presets import list_presets, load_preset, parse_preset, preset_text, save_preset
from .roots import OutsideRoots, Roots
from .thumbnails import THUMBNAILS_DIR, thumbnail
from .tools import convert_lora, inspect_lora, list_loras, merge_loras

DEFAULT_PORT = 7861
MAX_BODY = 1 << 20  # bytes of a request body (training options, a tool's arguments)
DRAIN_LIMIT = 64 << 20  # a longer body is read and dropped up to this size before the 413, a still longer one cut off
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}  # the only files served by name
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EVENT_INTERVAL_S = 0.25  # how often a job's event stream looks for new metrics lines and samples
_JOB_PATH = re.compile(r"^/api/jobs/(\d+)(?:/(events|log|stop|resume|samples/([^/]+)|images/([^/]+)))?$")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`): only this machine can reach it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`USER:PASS` as (user, password); a one-line error when it is not that."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASS, both non-empty")
    return user, password


class UiServer(ThreadingHTTPServer):
    """The server with what the handlers share: roots, jobs, the CSRF token, the credentials."""

    daemon_threads = True

    def __init__(self, host: str, port: int, roots: Roots, runner: JobRunner, auth: tuple[str, str] | None = None) -> None:
        if not is_loopback(host) and auth is None:
            raise UserError(
                f"--host {host} would let anyone who can reach this machine start jobs and read files under the roots: "
                "add --auth USER:PASS, or keep the default 127.0.0.1"
            )
        self.roots = roots
        self.runner = runner
        self.auth = auth
        self.csrf_token = secrets.token_urlsafe(32)
        self.image_sizes = SizeCache()
        self.closing = threading.Event()
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), Handler)
        self.port = self.server_address[1]
        names = ("127.0.0.1", "localhost", "[::1]") if is_loopback(host) else ()
        self.allowed_hosts = {f"{name}:{self.port}" for name in names} | ({host} if is_loopback(host) else set())

    def server_close(self) -> None:
        self.closing.set()
        super().server_close()
        self.runner.close()


class Handler(BaseHTTPRequestHandler):
    server: UiServer
    server_version = f"sdlora-ui/{__version__}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the terminal shows the URL and the jobs, not every request

    # ------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        if not self._allowed():
            return
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            if method in ("POST", "PUT"):
                body = self._body()  # read first (at most MAX_BODY), so a refused request leaves the connection clean
                self._check_csrf()
                (self._put if method == "PUT" else self._post)(url.path, body)
            else:
                self._get(url.path, query)
        except OutsideRoots as err:  # a training option's path too: the form shows it at its field
            self._json(HTTPStatus.FORBIDDEN, _error(err) | ({"option": err.option} if isinstance(err, OptionError) else {}))
        except OptionError as err:
            self._json(HTTPStatus.BAD_REQUEST, _error(err) | {"option": err.option})
        except _HttpError as err:
            self._json(err.status, {"error": str(err)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away
        except FileNotFoundError as err:
            self._json(HTTPStatus.NOT_FOUND, _error(err))
        except (UserError, OSError) as err:
            self._json(HTTPStatus.BAD_REQUEST, _error(err))
        except Exception as err:  # a bug or a library failing unforeseen: one line, as the CLI says it
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"unexpected error: {type(err).__name__}: {_line(err)}"})

    def _allowed(self) -> bool:
        """The host name and the credentials: a request that fails either is answered here (and its connection
        closed: its body is not read)."""
        keep_alive, self.close_connection = not self.close_connection, True
        if self.server.allowed_hosts and self.headers.get("Host") not in self.server.allowed_hosts:
            self._json(HTTPStatus.FORBIDDEN, {"error": f"requests must be addressed to {sorted(self.server.allowed_hosts)[0]}"})
            return False
        if self.server.auth is not None:
            user, password = self.server.auth
            expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected.encode()):
                self._json(HTTPStatus.UNAUTHORIZED, {"error": "log in (HTTP basic auth)"}, {"WWW-Authenticate": 'Basic realm="sdlora"'})
                return False
        self.close_connection = not keep_alive
        return True

    def _check_csrf(self) -> None:
        token = self.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(token.encode(), self.server.csrf_token.encode()):
            raise _HttpError(HTTPStatus.FORBIDDEN, "missing or wrong X-CSRF-Token header: take the token from GET /api/csrf")

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > MAX_BODY:
            self.close_connection = True
            if length <= DRAIN_LIMIT:  # read and dropped, so the client hears the answer instead of a reset connection
                for start in range(0, length, 1 << 16):
                    self.rfile.read(min(1 << 16, length - start))
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes: at most {MAX_BODY}")
        data = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(data) if data else {}
        except ValueError as err:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {err}") from None

    # ------------------------------------------------------------ GET

    def _get(self, path: str, query: dict[str, str]) -> None:
        runner, roots = self.server.runner, self.server.roots
        if path in ("/", "/index.html"):
            return self._file(STATIC_FILES["index.html"])
        if path.startswith("/static/"):
            name = unquote(path[len("/static/") :])
            if name not in STATIC_FILES:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no such file: {path}")
            return self._file(STATIC_FILES[name])
        if path == "/api/health":
            return self._json(HTTPStatus.OK, {"ok": True, "version": __version__})
        if path == "/api/csrf":
            return self._json(HTTPStatus.OK, {"token": self.server.csrf_token})
        if path == "/api/options":
            return self._json(HTTPStatus.OK, {"sections": option_schema(), "roots": [str(root) for root in roots.folders]})
        if path == "/api/jobs":
            return self._json(HTTPStatus.OK, {"jobs": [runner.describe(job["id"]) for job in runner.store.all()]})
        if path == "/api/loras":
            return self._json(HTTPStatus.OK, list_loras(_required(query, "dir"), roots))
        if path == "/api/datasets":
            return self._json(
                HTTPStatus.OK,
                describe_dataset(_required(query, "dir"), roots, query.get("caption_extension", ".txt"), self.server.image_sizes),
            )
        if path == "/api/model":  # the family of the form's model and the defaults that follow from it
            return self._json(HTTPStatus.OK, model_defaults(_required(query, "model"), roots))
        if path == "/api/presets":  # a config.toml under the roots as the form's options; without ?path, the ones to pick
            if "path" not in query:
                return self._json(HTTPStatus.OK, {"presets": list_presets(roots)})
            return self._json(HTTPStatus.OK, load_preset(_required(query, "path"), roots))
        if path == "/api/inspect":
            return self._json(HTTPStatus.OK, inspect_lora(_required(query, "path"), roots))
        if path == "/api/thumb":  # an image's thumbnail, made once and cached in the state folder
            return self._file(thumbnail(_required(query, "path"), roots, runner.state_dir / THUMBNAILS_DIR), cache=True)
        if path == "/api/file":
            real = roots.resolve(_required(query, "path"), "file")
            if real.suffix.lower() not in IMAGE_SUFFIXES:
                raise _HttpError(HTTPStatus.FORBIDDEN, f"only images are served ({', '.join(IMAGE_SUFFIXES)})")
            return self._file(real)
        match = _JOB_PATH.match(path)
        if match:
            job_id, action, sample = int(match.group(1)), match.group(2), match.group(3)
            if action is None:
                return self._json(HTTPStatus.OK, runner.describe(job_id))
            if action == "log":
                return self._json(HTTPStatus.OK, {"lines": runner.log_tail(job_id)})
            if action == "events":
                return self._events(job_id)
            image = match.group(4)
            if image is not None:  # an image job's picture, by a name it wrote
                job = runner.describe(job_id)
                if unquote(image) not in job["images"]:
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"job {job_id} has no image {unquote(image)}")
                return self._file(Path(job["output_dir"]) / unquote(image))
            if sample is not None:
                job = runner.describe(job_id)
                if unquote(sample) not in job["samples"]:
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"job {job_id} has no sample {unquote(sample)}")
                return self._file(Path(job["output_dir"]) / SAMPLES_DIR / unquote(sample))
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no such page or call: GET {path}")

    # ------------------------------------------------------------ POST

    def _post(self, path: str, body: Any) -> None:
        runner, roots = self.server.runner, self.server.roots
        if path == "/api/jobs":
            config = check_options(body, roots)
            job_id = runner.submit(config, body)
            return self._json(HTTPStatus.CREATED, {"id": job_id})
        if path == "/api/check":  # the form checked without starting anything
            check_options(body, roots)
            return self._json(HTTPStatus.OK, {"ok": True})
        if path == "/api/toml":  # the form as the config.toml `sdlora train --config` reads (a preset to download)
            return self._json(HTTPStatus.OK, {"toml": preset_text(body, roots)})
        if not isinstance(body, dict):
            raise UserError("the request body must be a JSON object")
        if path == "/api/presets":  # {"path": FILE.toml, "options": FORM}: the preset written under a root
            return self._json(HTTPStatus.OK, save_preset(_text(body, "path"), body.get("options"), roots))
        if path == "/api/presets/parse":  # {"toml": TEXT, "name": FILE}: an uploaded preset as the form's options
            return self._json(HTTPStatus.OK, parse_preset(body.get("toml"), body.get("name"), roots))
        if path in ("/api/grid", "/api/generate"):  # an X/Y comparison or a generated image, run as a job
            args = (grid_command if path == "/api/grid" else generate_command)(body, roots)
            return self._json(HTTPStatus.CREATED, {"id": runner.submit_command(args, body)})
        if path == "/api/convert":
            result = convert_lora(_text(body, "input"), _text(body, "output"), _text(body, "to"), roots)
            return self._json(HTTPStatus.OK, result)
        if path == "/api/merge":
            return self._json(HTTPStatus.OK, merge_loras(_text(body, "model"), body.get("loras"), _text(body, "output"), roots))
        match = _JOB_PATH.match(path)
        if match and match.group(2) in ("stop", "resume"):
            job_id = int(match.group(1))
            (runner.stop if match.group(2) == "stop" else runner.resume)(job_id)
            return self._json(HTTPStatus.OK, runner.describe(job_id))
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no such call: POST {path}")

    def _put(self, path: str, body: Any) -> None:
        if path == "/api/datasets/caption":  # {"image": PATH, "caption": TEXT, "caption_extension": ".txt"}
            if not isinstance(body, dict):
                raise UserError("the request body must be a JSON object")
            extension = body.get("caption_extension", ".txt")
            return self._json(HTTPStatus.OK, write_caption(_text(body, "image"), body.get("caption"), self.server.roots, str(extension)))
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no such call: PUT {path}")

    # ------------------------------------------------------------ answers

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value, allow_nan=False, default=str).encode("utf-8")
        self.send_response(status)
        self._common_headers("application/json", len(data))
        for key, header in (headers or {}).items():
            self.send_header(key, header)
        self.end_headers()
        self.wfile.write(data)

    def _file(self, path: Path, cache: bool = False) -> None:
        """A file's bytes; with `cache`, the browser may keep it for a day (a thumbnail: the dataset page asks for it
        with the image's modification time and size in its URL, so an edited image's is asked for anew)."""
        data = path.read_bytes()
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.send_response(HTTPStatus.OK)
        self._common_headers(
            kind + ("; charset=utf-8" if kind.startswith("text/") or kind.endswith("javascript") else ""), len(data), cache
        )
        self.end_headers()
        self.wfile.write(data)

    def _common_headers(self, kind: str, length: int | None, cache: bool = False) -> None:
        self.send_header("Content-Type", kind)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "private, max-age=86400" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'")

    def _events(self, job_id: int) -> None:
        """Server-sent events for a job: `metrics` (one per metrics.jsonl line, from the first), `sample` (one per sample
        image), `job` (its state, when it changes), `reset` (the log was cut: a resume), `end` (the job is over)."""
        runner = self.server.runner
        job = runner.describe(job_id)
        self.send_response(HTTPStatus.OK)
        self._common_headers("text/event-stream", None)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self._stream(job_id, Path(job["output_dir"]))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away; the job goes on
        except Exception as err:  # the headers are sent: the error is the stream's last event
            self._event("error", {"error": f"{type(err).__name__}: {_line(err)}"})

    def _stream(self, job_id: int, output_dir: Path) -> None:
        runner = self.server.runner
        metrics_path = output_dir / METRICS_FILE
        offset, sent_samples, last_state = 0, set(), None
        while not self.server.closing.is_set():
            job = runner.describe(job_id)
            records, offset, reset = read_new_metrics(metrics_path, offset)
            if reset:
                self._event("reset", {})
            for record in records:
                self._event("metrics", record)
            for name in sample_names(output_dir):
                if name not in sent_samples:
                    sent_samples.add(name)
                    self._event("sample", {"name": name, "url": f"/api/jobs/{job_id}/samples/{name}"})
            state = (job["status"], job["step"], job["error"])
            if state != last_state:
                last_state = state
                self._event("job", job)
            if job["status"] not in ACTIVE and not records:
                self._event("end", {"status": job["status"]})
                return
            self.wfile.flush()
            time.sleep(EVENT_INTERVAL_S)

    def _event(self, name: str, value: Any) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(value, default=str)}\n\n".encode())
        self.wfile.flush()


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename and str(err.filename) not in err.strerror else "")
    return text.splitlines()[0] if text else type(err).__name__


def _error(err: BaseException) -> dict[str, str]:
    return {"error": _line(err)}


def _required(query: dict[str, str], name: str) -> str:
    if not query.get(name):
        raise UserError(f"give ?{name}=...")
    return query[name]


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} is required (a string)")
    return value


def make_server(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    roots: list[str] | None = None,
    state_dir: str | None = None,
    auth: str | None = None,
    parallel: int = 1,
) -> UiServer:
    """The UI's server, bound but not yet serving (port 0: a free port, read back from `.port`). `state_dir` holds
    the jobs' table and folders (default: `.sdlora-ui` in the first root)."""
    folders = Roots(roots or ["."])
    credentials = parse_auth(auth)
    runner = JobRunner(Path(state_dir) if state_dir else folders.home / ".sdlora-ui", parallel=parallel)
    try:
        return UiServer(host, port, folders, runner, credentials)
    except BaseException:
        runner.close()  # the port taken, or another address without --auth: the state is free again
        raise


def serve(server: UiServer) -> None:
    """Serve until Ctrl-C; running jobs go on (each in its own process group) and a new UI finds them."""
    host = server.server_address[0]
    shown = f"[{host}]" if ":" in host else host
    print(f"sdlora ui: http://{shown}:{server.port}/ (roots: {', '.join(map(str, server.roots.folders))}; Ctrl-C to quit)", flush=True)
    if not is_loopback(host):
        print(
            f"sdlora ui: warning: listening on {host}, reachable from other machines; basic auth over plain HTTP sends the "
            "password readable: use it on a trusted network or behind a TLS proxy",
            file=sys.stderr,
            flush=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("sdlora ui: stopped; running jobs go on (sdlora ui on the same --state shows them again)", file=sys.stderr)
    finally:
        server.server_close()
