"""Benchmark `sdlora merge` of LyCORIS kinds (LoHa, LoKr) against a plain LoRA of the same modules.

On the SD1.5-shaped random model (`sdlora tiny-model DIR --variant sd15-shaped`, fp32), kohya-format files on
kohya's default targets (the UNet transformer blocks' Linears and 1x1 convs, the text encoder's attention and MLP):
a LoRA of rank R, a LoHa of dim R (two rank-R products), a LoKr with its second half factored at dim R. Each merge
runs in its own subprocess; the table has the median wall time, peak RSS and update arithmetic of N runs, and each
kind's ratio to the plain LoRA (the issue's bar: within 2x in time and memory). Then `convert --rank R` of each
file back to a plain LoRA, timed the same way.

    python bench/bench_merge_kinds.py [--work /tmp/sdlora-bench] [--rank 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import SUMMARY, bench_layers, ensure_sd15_model, run_measured  # noqa: E402  (the bench scripts' shared parts)


def _factor_pair(size: int) -> tuple[int, int]:
    """LyCORIS's LoKr split of a width: the largest factor up to its square root, and the rest."""
    first = max(d for d in range(1, int(size**0.5) + 1) if size % d == 0)
    return first, size // first


def write_kind_files(model: Path, rank: int, work: Path) -> dict[str, Path]:
    """{kind: kohya file} for LoRA, LoHa and LoKr on the same modules, shaped from the model's headers."""
    from sdlora.core.files import write_kohya
    from sdlora.core.kinds import LohaModule, LokrModule
    from sdlora.core.state import LoraModule, LoraState

    generator = torch.Generator().manual_seed(rank)

    def rand(*shape):
        return torch.randn(shape, generator=generator) * 0.01

    states: dict[str, dict] = {"lora": {}, "loha": {}, "lokr": {}}
    for key, shape in bench_layers(model):
        (out, inner), trailing = shape[:2], [1] * (len(shape) - 2)
        states["lora"][key] = LoraModule(rand(rank, inner, *trailing), rand(out, rank, *trailing), rank / 2)
        states["loha"][key] = LohaModule(rand(out, rank), rand(rank, inner), rand(out, rank), rand(rank, inner), alpha=rank / 2)
        (out1, out2), (in1, in2) = _factor_pair(out), _factor_pair(inner)
        states["lokr"][key] = LokrModule(w1=rand(out1, in1), w2a=rand(out2, rank), w2b=rand(rank, in2), alpha=rank / 2)
    return {kind: write_kohya(LoraState(modules), work / f"kind-{kind}-r{rank}.safetensors") for kind, modules in states.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sdlora-bench"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    model = ensure_sd15_model(work)
    files = write_kind_files(model, args.rank, work)
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads; rank/dim {args.rank}")
    merges: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in files}
    converts: dict[str, list[float]] = {kind: [] for kind in files}
    for repeat in range(args.repeats):
        for kind, lora in files.items():
            out = work / "out-kinds"
            shutil.rmtree(out, ignore_errors=True)
            seconds, rss, text = run_measured(
                [sys.executable, "-m", "sdlora", "merge", "--model", str(model), "--lora", str(lora), "--out", str(out)]
            )
            arithmetic = float(SUMMARY.search(text).group(3))
            merges[kind].append((seconds, rss, arithmetic))
            converted = work / f"converted-{kind}.safetensors"
            seconds_convert, _, _ = run_measured(
                [sys.executable, "-m", "sdlora", "convert", str(lora), str(converted), "--to", "diffusers", "--rank", str(args.rank)]
            )
            converts[kind].append(seconds_convert)
            print(
                f"  run {repeat + 1} {kind}: merge {seconds:.1f} s, {rss:.2f} GiB, arithmetic {arithmetic:.2f} s; convert {seconds_convert:.1f} s",
                flush=True,
            )
    shutil.rmtree(work / "out-kinds", ignore_errors=True)
    medians = {kind: [statistics.median(column) for column in zip(*runs)] for kind, runs in merges.items()}
    base_time, base_rss, base_arithmetic = medians["lora"]
    print(f"\nmerge into the fp32 SD1.5-shaped folder, {len(merges)} kinds on the same modules; median of {args.repeats}")
    print("| kind | merge | peak RSS | update arithmetic | time / LoRA | RSS / LoRA | arithmetic / LoRA | convert --rank to LoRA |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, (seconds, rss, arithmetic) in medians.items():
        print(
            f"| {kind} | {seconds:.1f} s | {rss:.2f} GiB | {arithmetic:.2f} s | {seconds / base_time:.2f} | {rss / base_rss:.2f} | "
            f"{arithmetic / base_arithmetic:.2f} | {statistics.median(converts[kind]):.1f} s |"
        )


if __name__ == "__main__":
    main()
