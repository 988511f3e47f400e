"""Benchmark `sdlora merge` against diffusers' from_pretrained + load_lora_weights + fuse_lora + save_pretrained.

On the SD1.5-shaped random model (`sdlora tiny-model DIR --variant sd15-shaped`, a 3.4 GB fp32 UNet) with a random
LoRA on kohya's default targets (every Linear and 1x1 conv of the UNet's transformer blocks, the text encoder's
attention and MLP), at each rank: end-to-end time and peak RSS of each tool, each run in its own subprocess,
median of N runs, as a ratio; and the merge arithmetic's time against the memory-bandwidth floor for the bytes it
touches (bandwidth measured here with a large tensor copy).

    python bench/bench_merge.py [--work /tmp/sdlora-bench] [--ranks 16 128] [--repeats 3]
    python bench/bench_merge.py --e2e [--repeats 5]    # the fp16 folder end to end against import torch + cp -r
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

UNET_TARGETS = re.compile(
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$"
)
TEXT_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))\.weight$")
SUMMARY = re.compile(r"merged (\d+) LoRA modules into (\d+) weights .*\(update arithmetic ([\d.]+) s over ([\d.]+) GB\)")


def bench_layers(model: Path):
    """(LoraState module path, weight shape) of kohya's default targets in an SD1-shaped folder, from its headers."""
    from sdlora.storage.safetensors_stream import read_header

    for component, file, pattern in (
        ("unet", "unet/diffusion_pytorch_model.safetensors", UNET_TARGETS),
        ("text_encoder", "text_encoder/model.safetensors", TEXT_TARGETS),
    ):
        for name, info in read_header(model / file).tensors.items():
            if not pattern.search(name):
                continue
            path = name.removesuffix(".weight")
            if component == "text_encoder" and not path.startswith("text_model."):
                path = "text_model." + path  # LoraState keeps `text_model.` (transformers 5 drops it from the weights)
            yield f"{component}.{path}", tuple(info.shape)


def write_bench_lora(model: Path, rank: int, out: Path) -> tuple[Path, int]:
    """A random diffusers-format LoRA (alpha = rank / 2) shaped from the model's weight headers, no model loaded,
    and the FLOPs of merging it (2 * rank per weight element)."""
    from sdlora.core.files import write_lora
    from sdlora.core.state import LoraModule, LoraState

    generator = torch.Generator().manual_seed(rank)
    modules, flops = {}, 0
    for key, shape in bench_layers(model):
        trailing = shape[2:]
        down = torch.randn(rank, shape[1], *trailing, generator=generator) * 0.01
        up = torch.randn(shape[0], rank, *([1] * len(trailing)), generator=generator) * 0.01
        modules[key] = LoraModule(down, up, rank / 2)
        flops += 2 * rank * down[0].numel() * up.shape[0]
    return write_lora(LoraState(modules), out, "diffusers"), flops


def reference_merge(model: str, lora: str, out: str) -> None:
    """What a diffusers user writes to bake a LoRA into a model."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_lora_weights(lora, adapter_name="bench")
    pipe.fuse_lora(adapter_names=["bench"], lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.save_pretrained(out, safe_serialization=True)


# Linux counts the parent's resident memory at fork/exec in a child's peak RSS, so the command starts from a small
# launcher (no torch) that times it and reads its rusage: the figures are the command's own.
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB, of that process alone) and output of a command (extra environment: `env`)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder, "report")
        result = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(report), *command],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        seconds, max_rss_kib, returncode = report.read_text().split() if report.exists() else (0, 0, result.returncode or 1)
    if int(returncode) != 0:
        raise SystemExit(f"{' '.join(command)} failed ({returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return float(seconds), int(max_rss_kib) / 2**20, result.stdout + result.stderr


def ensure_sd15_model(work: Path) -> Path:
    """The SD1.5-shaped random model folder under `work` (both made if missing; an existing model is reused)."""
    work.mkdir(parents=True, exist_ok=True)
    model = work / "sd15-shaped"
    if not (model / "model_index.json").is_file():
        run_measured([sys.executable, "-m", "sdlora", "tiny-model", str(model), "--variant", "sd15-shaped"])
    return model


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP per second of the best of `repeats` square matmuls: the compute ceiling of the update up @ down."""
    left, right = torch.randn(size, size), torch.randn(size, size)
    torch.mm(left, right)  # warm-up: thread pool and BLAS start-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(left, right)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second moved (read + written) by the best of `repeats` copies of a `gib` GiB fp32 tensor."""
    source = torch.randn(int(gib * 2**30) // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def same_merge(a: Path, b: Path, name: str) -> float:
    """Largest relative difference between the two tools' merged UNet weight `name`."""
    from safetensors import safe_open

    tensors = []
    for folder in (a, b):
        with safe_open(str(folder / "unet/diffusion_pytorch_model.safetensors"), "pt") as handle:
            tensors.append(handle.get_tensor(name))
    return float((tensors[0] - tensors[1]).abs().max() / tensors[1].abs().max())


def fp16_copy(model: Path, out: Path) -> Path:
    """The model folder with every floating tensor in fp16 (as SD1.5 is usually shared: 1.8 GB)."""
    from safetensors.torch import load_file, save_file

    if (out / "model_index.json").is_file():
        return out
    for file in sorted(p for p in model.rglob("*") if p.is_file()):
        target = out / file.relative_to(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(target), metadata={"format": "pt"})
        else:
            shutil.copy2(file, target)
    return out


def end_to_end(work: Path, model: Path, repeats: int) -> None:
    """`sdlora merge` of an fp16 SD1.5-shaped folder end to end, against torch's import time plus a plain `cp -r`."""
    folder = fp16_copy(model, work / "sd15-shaped-fp16")
    lora, _ = write_bench_lora(model, 16, work / "lora-r16.safetensors")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    timings: dict[str, list[float]] = {"import torch": [], "cp -r": [], "sdlora merge": []}
    for _ in range(repeats):
        for name, command in {
            "import torch": [sys.executable, "-c", "import torch"],
            "cp -r": ["cp", "-r", str(folder), str(work / "out-copy")],
            "sdlora merge": [
                sys.executable,
                "-m",
                "sdlora",
                "merge",
                "--model",
                str(folder),
                "--lora",
                f"{lora}:0.8",
                "--out",
                str(work / "out-sdlora"),
            ],
        }.items():
            shutil.rmtree(work / "out-copy", ignore_errors=True)
            shutil.rmtree(work / "out-sdlora", ignore_errors=True)
            seconds, _, _ = run_measured(command)
            timings[name].append(seconds)
    shutil.rmtree(work / "out-copy", ignore_errors=True)
    shutil.rmtree(work / "out-sdlora", ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    target = medians["import torch"] + 1.5 * medians["cp -r"]
    print(f"\nend to end, the fp16 SD1.5-shaped folder ({size / 1e9:.2f} GB), rank-16 LoRA on 204 modules; median of {repeats}")
    print("| import torch | cp -r | target: import + 1.5 x cp | sdlora merge | sdlora / target |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {medians['import torch']:.2f} s | {medians['cp -r']:.2f} s | {target:.2f} s | {medians['sdlora merge']:.2f} s | {medians['sdlora merge'] / target:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "sdlora-bench"),
        help="folder for the model, LoRAs and outputs (the model is reused)",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--e2e", action="store_true", help="instead: sdlora merge of the fp16 folder end to end against import torch + cp -r"
    )
    args = parser.parse_args()
    work = Path(args.work)
    model = ensure_sd15_model(work)
    if args.e2e:
        end_to_end(work, model, args.repeats)
        return
    bandwidth, compute = copy_bandwidth(), matmul_flops()
    print(
        f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"memory bandwidth (1 GiB fp32 tensor copy, read + write): {bandwidth / 1e9:.1f} GB/s; fp32 matmul: {compute / 1e9:.0f} GFLOP/s")
    rows = []
    for rank in args.ranks:
        lora, flops = write_bench_lora(model, rank, work / f"lora-r{rank}.safetensors")
        commands = {
            "sdlora": [
                sys.executable,
                "-m",
                "sdlora",
                "merge",
                "--model",
                str(model),
                "--lora",
                str(lora),
                "--out",
                str(work / "out-sdlora"),
            ],
            "diffusers": [sys.executable, __file__, "--reference", str(model), str(lora), str(work / "out-diffusers")],
        }
        runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
        arithmetic = []
        for repeat in range(args.repeats):
            for tool, command in commands.items():
                shutil.rmtree(work / f"out-{tool}", ignore_errors=True)
                seconds, rss, text = run_measured(command)
                runs[tool].append((seconds, rss))
                if tool == "sdlora":
                    modules, tensors, arithmetic_s, gigabytes = SUMMARY.search(text).groups()
                    arithmetic.append(float(arithmetic_s))
                print(f"  rank {rank} run {repeat + 1} {tool}: {seconds:.1f} s, {rss:.2f} GiB", flush=True)
        difference = same_merge(
            work / "out-sdlora", work / "out-diffusers", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        )
        sd_time, sd_rss = (statistics.median(v) for v in zip(*runs["sdlora"]))
        ref_time, ref_rss = (statistics.median(v) for v in zip(*runs["diffusers"]))
        floor = float(gigabytes) * 1e9 / bandwidth
        rows.append(
            (
                rank,
                modules,
                tensors,
                sd_time,
                ref_time,
                sd_rss,
                ref_rss,
                statistics.median(arithmetic),
                float(gigabytes),
                floor,
                flops / compute,
                difference,
            )
        )
    shutil.rmtree(work / "out-sdlora", ignore_errors=True)
    shutil.rmtree(work / "out-diffusers", ignore_errors=True)
    print(f"\nmedian of {args.repeats}; time end to end (process start to exit), peak RSS of the process")
    print("| rank | sdlora merge | diffusers | speed-up | sdlora peak RSS | diffusers peak RSS | memory ratio | max rel. diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rank, _, _, sd_time, ref_time, sd_rss, ref_rss, *_, difference in rows:
        print(
            f"| {rank} | {sd_time:.1f} s | {ref_time:.1f} s | {ref_time / sd_time:.1f}x | {sd_rss:.2f} GiB | {ref_rss:.2f} GiB | {sd_rss / ref_rss:.2f} | {difference:.1e} |"
        )
    print("\nmerge arithmetic (fp32 update of the adapted weights, file I/O excluded) against its floors")
    print(
        "| rank | LoRA modules / weights | arithmetic | bytes touched | bandwidth floor | arithmetic / bandwidth floor | matmul compute floor | arithmetic / max(floors) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rank, modules, tensors, *_, arith, gigabytes, floor, compute_floor, _ in rows:
        print(
            f"| {rank} | {modules} / {tensors} | {arith:.2f} s | {gigabytes:.2f} GB | {floor:.3f} s | {arith / floor:.1f}x | "
            f"{compute_floor:.3f} s | {arith / max(floor, compute_floor):.1f}x |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--reference":
        reference_merge(*sys.argv[2:])
    else:
        main()
