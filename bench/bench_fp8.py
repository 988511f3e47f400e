"""`--fp8-base`: what fp8 storage of the frozen weights saves and what it costs, as two tables.

1. Memory: the SD1.5-shaped model (real SD1.5 UNet shapes, random weights; `sdlora.models.tiny`) in bf16, then its
   UNet's and text encoder's Linear/Conv2d weights stored as float8_e4m3fn as `--fp8-base` does: the bytes those
   frozen weights hold (exact, from the tensors) and the process's resident memory before and after (RSS, from
   /proc/self/statm after glibc's malloc_trim: what the process gave back; it includes torch, diffusers and the rest).
2. Loss: the README's main job (`sdlora train datasets_examples/flat_poster --config .../train.toml`, the demo
   model, 300 steps) with `--mixed-precision bf16`, without and with `--fp8-base`, each in its own process: the
   held-out loss (`val_loss`) at the last validation of metrics.jsonl, and the wall time.

    python bench/bench_fp8.py [--only memory|loss] [--precision bf16 no ...] [--steps N] [--together]
        [--seeds 42 1 2 3] [--no-samples]

`--seeds` runs the pair once per seed (the job's own is 42) and adds the mean and spread of fp8 / plain: one pair's
ratio mixes fp8's effect with where two chaotic trajectories happen to end. `--no-samples` leaves the job's sample
images out (they take most of its wall time in bf16 on a CPU; the training steps and validation draw nothing from
them, so the losses are the same).

`--precision no` adds the fp32 pair (fp8 weights cast up to fp32), which is what `--fp8-base` does without mixed
precision.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "datasets_examples" / "flat_poster"
GIB = 2**30


def _rss() -> int:
    """The process's resident bytes now (Linux), after handing freed heap memory back to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps small freed blocks otherwise, and RSS would not show them gone
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_table() -> list[str]:
    """Bytes of the SD1.5-shaped UNet's and text encoder's frozen Linear/Conv2d weights in bf16 and in fp8."""
    import torch

    from sdlora.models.tiny import build_sd15_shaped_pipeline
    from sdlora.training.fp8 import frozen_weight_bytes, store_weights_in_fp8

    pipe = build_sd15_shaped_pipeline()
    parts = {"UNet": pipe.unet, "text encoder (2 layers)": pipe.text_encoder}
    for part in parts.values():
        part.to(torch.bfloat16).requires_grad_(False)
    pipe.vae = None  # not part of the comparison: its memory would only blur the RSS figures
    before = {name: frozen_weight_bytes(part) for name, part in parts.items()}
    rss_before = _rss()
    for part in parts.values():
        store_weights_in_fp8(part, torch.bfloat16)
    rss_after = _rss()
    after = {name: frozen_weight_bytes(part) for name, part in parts.items()}
    rows = [
        "| SD1.5-shaped part | frozen Linear/Conv2d weights, bf16 | fp8 (`--fp8-base`) | fp8 / bf16 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in parts:
        rows.append(f"| {name} | {before[name] / GIB:.3f} GiB | {after[name] / GIB:.3f} GiB | {after[name] / before[name]:.3f} |")
    rows.append(
        f"| process RSS (UNet + text encoder) | {rss_before / GIB:.2f} GiB | {rss_after / GIB:.2f} GiB | {rss_after / rss_before:.3f} |"
    )
    return rows


def _command(precision: str, fp8: bool, out: Path, steps: int | None, seed: int | None = None, samples: bool = True) -> list[str]:
    """The README's main job at `precision` (with --fp8-base if `fp8`); with `steps`, cut to that many steps with one
    validation at the end and no samples at step 0; with `seed`, at that seed; without `samples`, drawing none."""
    command = [sys.executable, "-m", "sdlora", "train", str(EXAMPLE), "--config", str(EXAMPLE / "train.toml"), "--output", str(out)]
    command += ["--mixed-precision", precision] + (["--fp8-base"] if fp8 else [])
    command += ["--seed", str(seed)] if seed is not None else []
    command += [] if samples else ["--no-samples", "--no-sample-at-first"]
    if steps:
        command += ["--steps", str(steps), "--validate-every", str(steps), "--checkpoint-every", "0", "--no-sample-at-first"]
    return command


def _train_pair(
    precision: str, folder: Path, steps: int | None, together: bool, seed: int | None = None, samples: bool = True
) -> list[tuple[float, float, float]]:
    """Plain and --fp8-base runs (one after the other, or at once with `together`): (val_loss at step 0, last
    val_loss, wall seconds) of each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = [folder / f"{precision}-{seed}-plain", folder / f"{precision}-{seed}-fp8"]
    commands = [_command(precision, fp8, out, steps, seed, samples) for fp8, out in zip((False, True), outs)]
    walls, pending = [0.0, 0.0], []
    for index, command in enumerate(commands):
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        pending.append((index, start, process))
        if not together:
            _finish(pending.pop(), walls, command)
    while pending:
        _finish(pending.pop(0), walls, commands[0])
    results = []
    for out, wall in zip(outs, walls):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        validations = [line["val_loss"] for line in lines if "val_loss" in line]
        results.append((validations[0], validations[-1], wall))
    return results


def _finish(pending: tuple[int, float, subprocess.Popen], walls: list[float], command: list[str]) -> None:
    index, start, process = pending
    _, stderr = process.communicate()
    walls[index] = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")


def loss_table(
    precisions: list[str], steps: int | None, together: bool, seeds: list[int | None] | None = None, samples: bool = True
) -> list[str]:
    """Held-out loss after the README's main job (or its first `steps`), without and with --fp8-base, per precision
    and seed; with several seeds, each precision's mean fp8 / plain ratio and its spread (sample standard deviation)."""
    rows = [
        "| `--mixed-precision` | seed | steps | val_loss at step 0, plain / fp8 | val_loss at the end, plain | `--fp8-base` "
        "| fp8 / plain | wall, plain | `--fp8-base` |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seeds = seeds or [None]
    with tempfile.TemporaryDirectory() as folder:
        for precision in precisions:
            ratios = []
            for seed in seeds:
                pair = _train_pair(precision, Path(folder), steps, together, seed, samples)
                (plain_0, plain, plain_wall), (fp8_0, fp8, fp8_wall) = pair
                ratios.append(fp8 / plain)
                rows.append(
                    f"| {precision} | {42 if seed is None else seed} | {steps or 300} | {plain_0:.4f} / {fp8_0:.4f} | {plain:.4f} "
                    f"| {fp8:.4f} | {fp8 / plain:.3f} | {plain_wall:.0f} s | {fp8_wall:.0f} s |"
                )
            if len(ratios) > 1:
                rows.append(
                    f"| {precision} | mean of {len(ratios)} | | | | | {statistics.mean(ratios):.3f} "
                    f"(sd {statistics.stdev(ratios):.3f}) | | |"
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("memory", "loss"))
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=("bf16", "fp16", "no"))
    parser.add_argument("--steps", type=int, help="cut the job to this many steps (one validation at the end); default: its 300")
    parser.add_argument("--together", action="store_true", help="run the plain and fp8 jobs at once (a busy machine)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run the pair at each of these seeds (default: the job's 42)")
    parser.add_argument("--no-samples", action="store_true", help="draw no sample images (the losses are the same)")
    args = parser.parse_args()
    if args.only != "loss":
        print("\n".join(memory_table()) + "\n")
    if args.only != "memory":
        print("\n".join(loss_table(args.precision, args.steps, args.together, args.seeds, not args.no_samples)))


if __name__ == "__main__":
    main()
