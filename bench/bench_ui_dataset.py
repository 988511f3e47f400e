"""`sdlora ui` at scale: the dataset page of a folder of N small captioned images, and how long a metrics.jsonl line
takes to reach a job's event stream. Prints two tables.

1. Dataset: a UI on a free port over a temporary root holding N images (512-1024 px, half JPEG and half PNG, a
   caption each). Cold: the first `GET /api/datasets` of a new server (the OS's file cache warm, as after generating) and
   every image's first `GET /api/thumb` (made and cached); warm: the same calls again (the thumbnails read from the
   cache), and the full-size `GET /api/file` of every image for comparison (what the page fetched before thumbnails).
   Median of `--repeats` runs; each cold run on a new server and an empty thumbnail folder.
2. Events: a job marked running (no process: the stream only reads its folder) whose metrics.jsonl gets a line every
   0.1-0.6 s; for each line, the time from its write to its arrival on `GET /api/jobs/ID/events` (the stream looks
   every EVENT_INTERVAL_S = 0.25 s).

    python bench/bench_ui_dataset.py [--images 2000] [--repeats 3] [--lines 30]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlora.ui.server import EVENT_INTERVAL_S, make_server  # noqa: E402  (the checkout's sdlora, not an installed one)
from sdlora.ui.thumbnails import THUMBNAILS_DIR  # noqa: E402


def make_images(folder: Path, count: int) -> None:
    """`count` captioned pictures as a dataset has them: 512-1024 px a side, half JPEG (quality 90), half PNG; a
    coloured gradient with a few shapes each (what a photo costs to decode, roughly, without storing photos)."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for index in range(count):
        width, height = rng.randrange(512, 1025, 64), rng.randrange(512, 1025, 64)
        dark, light = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        picture = ImageOps.colorize(Image.linear_gradient("L").resize((width, height)), dark, light)
        draw = ImageDraw.Draw(picture)
        for _ in range(4):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.ellipse((x, y, x + rng.randrange(40, 200), y + rng.randrange(40, 200)), fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"img{index:05d}"
        if index % 2:
            picture.save(folder / f"{name}.png")
        else:
            picture.save(folder / f"{name}.jpg", quality=90)
        (folder / f"{name}.txt").write_text(f"a shape, colour {index % 17}, style {index % 5}")


def start(root: Path, state: Path):
    server = make_server(port=0, roots=[str(root)], state_dir=str(state))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


def get(base: str, path: str) -> bytes:
    with urllib.request.urlopen(base + path, timeout=600) as response:
        return response.read()


def timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def dataset_run(root: Path, state: Path, count: int, sizes: dict[str, int]) -> dict[str, float]:
    """One cold and warm pass on a new server with an empty thumbnail folder: seconds of each call."""
    server = start(root, state)
    base = f"http://127.0.0.1:{server.port}"
    seconds: dict[str, float] = {}
    try:
        listing: dict = {}

        def page() -> None:
            listing.update(json.loads(get(base, "/api/datasets?dir=data")))

        seconds["GET /api/datasets, cold (new server)"] = timed(page)
        seconds["GET /api/datasets, warm"] = timed(page)
        images = listing["images"]
        assert len(images) == count, len(images)
        sizes["api"] = len(json.dumps(listing))

        def thumbs() -> None:
            sizes["thumbs"] = sum(len(get(base, image["thumb"])) for image in images)

        def files() -> None:
            sizes["files"] = sum(len(get(base, image["url"])) for image in images)

        seconds[f"{count} thumbnails, cold (made)"] = timed(thumbs)
        seconds[f"{count} thumbnails, warm (cached)"] = timed(thumbs)
        seconds[f"{count} full-size images"] = timed(files)
        assert len(list((state / THUMBNAILS_DIR).rglob("*.jpg"))) == count
    finally:
        stop(server)
        shutil.rmtree(state)
    return seconds


def dataset_table(count: int, repeats: int) -> list[str]:
    runs: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        make_images(root / "data", count)
        for repeat in range(repeats):
            for name, seconds in dataset_run(root, Path(tmp) / f"state{repeat}", count, sizes).items():
                runs.setdefault(name, []).append(seconds)
    lines = [
        f"{count} images ({sizes['api'] / 1e6:.2f} MB of JSON; thumbnails {sizes['thumbs'] / 1e6:.1f} MB, full-size files "
        f"{sizes['files'] / 1e6:.1f} MB), median of {repeats} runs",
        "",
        "| call | median s | per image ms | runs s |",
        "| --- | --- | --- | --- |",
    ]
    for name, times in runs.items():
        median = statistics.median(times)
        per_image = f"{1000 * median / count:.2f}" if "image" in name or "thumbnail" in name else ""
        lines.append(f"| {name} | {median:.3f} | {per_image} | {' '.join(f'{t:.3f}' for t in times)} |")
    return lines


def events_table(line_count: int) -> list[str]:
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "run").mkdir(parents=True)
        server = start(root, Path(tmp) / "state")
        try:
            job_id = server.runner.store.add({"output_dir": "run"}, str(root / "run"), line_count)
            server.runner.store.update(job_id, status="running", pid=None, started=time.time())
            metrics = root / "run" / "metrics.jsonl"
            written: dict[int, float] = {}

            def writer() -> None:
                rng = random.Random(1)
                time.sleep(0.5)
                for step in range(1, line_count + 1):
                    with open(metrics, "a") as handle:
                        written[step] = time.time()
                        handle.write(json.dumps({"step": step, "loss": 0.1, "time": written[step]}) + "\n")
                    time.sleep(rng.uniform(0.1, 0.6))
                server.runner.store.update(job_id, status="done")

            threading.Thread(target=writer, daemon=True).start()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/jobs/{job_id}/events", timeout=120) as stream:
                name = None
                for raw in stream:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        name = line[len("event: ") :]
                    elif line.startswith("data: ") and name == "metrics":
                        record = json.loads(line[len("data: ") :])
                        latencies.append(time.time() - written[record["step"]])
                    elif name == "end":
                        break
        finally:
            stop(server)
    assert len(latencies) == line_count, len(latencies)
    ordered = sorted(latencies)
    return [
        f"metrics.jsonl line -> event stream, {line_count} lines (the stream looks every {EVENT_INTERVAL_S} s)",
        "",
        "| median s | 90th percentile s | max s |",
        "| --- | --- | --- |",
        f"| {statistics.median(ordered):.3f} | {ordered[int(0.9 * (len(ordered) - 1))]:.3f} | {ordered[-1]:.3f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lines", type=int, default=30)
    args = parser.parse_args()
    print("\n".join(dataset_table(args.images, args.repeats)))
    print()
    print("\n".join(events_table(args.lines)))


if __name__ == "__main__":
    main()
