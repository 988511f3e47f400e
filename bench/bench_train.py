"""Training speed and memory: steps/s and peak RSS of `sdlora train`, median of several runs, as a table.

Configurations (from the trainer issue): the tiny model at 64 px, rank 4, batch 4; the SD1.5-shaped model
(real SD1.5 UNet and VAE shapes, random weights) at 256 px, rank 16, batch 1; each in fp32 and with bf16
autocast, latent/embedding caching on and off. Each run is its own process; time per step is measured over the
steps after a warm-up, peak RSS is the process's own (ru_maxrss).

The reference is diffusers' examples/text_to_image/train_text_to_image_lora.py as the issue measured it on this
machine class with the same models and settings (0.89 s/step tiny; 3.75 s/step and 5.6 GiB SD1.5-shaped, fp32);
the ratios use those figures. Running the reference side by side is not built yet.

    python bench/bench_train.py [--repeats 3] [--steps 8] [--only tiny|sd15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUOTED_REFERENCE = {"tiny": (0.89, None), "sd15": (3.75, 5.6)}  # s/step, peak RSS GiB (fp32, measured by the issue)
CONFIGS = {
    "tiny": dict(resolution=64, rank=4, alpha=4.0, batch_size=4),
    "sd15": dict(resolution=256, rank=16, alpha=16.0, batch_size=1),
}

# One training run in a child process: times each optimizer step through the metrics log's timestamps.
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from sdlora.config import TrainConfig
from sdlora.trainer import train
options = json.loads(sys.argv[1])
start = time.perf_counter()
train(TrainConfig(**options).validate())
total = time.perf_counter() - start
lines = [json.loads(l) for l in Path(options["output_dir"], "metrics.jsonl").read_text().splitlines()]
times = [l["time"] for l in lines if "loss" in l]
warmup = 2
per_step = (times[-1] - times[warmup - 1]) / (len(times) - warmup)
print(json.dumps({"s_per_step": per_step, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "total_s": total}))
"""


def make_dataset(folder: Path, count: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), (235, 230, 220))
        ImageDraw.Draw(image).rectangle((size // 5, size // 5, size * 4 // 5, size * 4 // 5), fill=(40 * index % 255, 90, 160))
        image.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(f"benchstyle, a square number {index}")
    return folder


def run_ours(model: str, data: Path, out: Path, settings: dict, precision: str, cache: str, steps: int) -> dict:
    options = dict(data_dir=str(data), output_dir=str(out), model=model, steps=steps, lr=1e-4, mixed_precision=precision, cache=cache,
                   checkpoint_every=0, validate_every=0, sample_steps=1, seed=0, **settings)
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run; the first 2 are warm-up")
    parser.add_argument("--only", choices=tuple(CONFIGS), default=None)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sdlora-bench"), help="folder for the SD1.5-shaped model and data")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--caches", nargs="+", default=["memory", "off"])
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for name, settings in CONFIGS.items():
        if args.only and name != args.only:
            continue
        model = "tiny"
        if name == "sd15":
            model = str(work / "sd15-shaped")
            if not Path(model, "model_index.json").is_file():
                subprocess.run([sys.executable, "-m", "sdlora", "tiny-model", model, "--variant", "sd15-shaped"], check=True)
        data = make_dataset(work / f"data-{name}", count=8, size=settings["resolution"])
        for precision in args.precisions:
            for cache in args.caches:
                results = []
                for repeat in range(args.repeats):
                    with tempfile.TemporaryDirectory(dir=work) as out:
                        results.append(run_ours(model, data, Path(out) / "run", settings, precision, cache, args.steps))
                s_per_step = statistics.median(r["s_per_step"] for r in results)
                rss = statistics.median(r["peak_rss_gib"] for r in results)
                ref_s, ref_rss = QUOTED_REFERENCE[name]
                rows.append((name, precision, cache, s_per_step, rss, ref_s / s_per_step, rss / ref_rss if ref_rss else None))
                print(f"{name} {precision} cache={cache}: {s_per_step:.3f} s/step, {rss:.2f} GiB", file=sys.stderr, flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (2 cores); {args.repeats} runs each, median; {args.steps} steps, first 2 warm-up\n")
    print("| model | precision | cache | s/step | steps/s | peak RSS | speed vs reference | memory vs reference |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, precision, cache, s_per_step, rss, speed, memory in rows:
        memory_text = f"{memory:.2f}x" if memory is not None else "n/a"
        print(f"| {name} | {'fp32' if precision == 'no' else precision} | {cache} | {s_per_step:.3f} | {1 / s_per_step:.2f} | {rss:.2f} GiB | {speed:.2f}x | {memory_text} |")
    print("\nreference: the issue's measurement of diffusers' train_text_to_image_lora.py on this machine class (fp32): tiny 0.89 s/step; SD1.5-shaped 3.75 s/step, 5.6 GiB")


if __name__ == "__main__":
    main()
