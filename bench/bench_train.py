"""Training speed and memory: steps/s and peak RSS of `sdlora train`, median of several runs, as a table.

Configurations (from the trainer issue): the tiny model at 64 px, rank 4, batch 4; the SD1.5-shaped model
(real SD1.5 UNet and VAE shapes, random weights) at 256 px, rank 16, batch 1; each in fp32 and with bf16
autocast, latent/embedding caching on and off. Each run is its own process; time per step is measured over the
steps after a warm-up, peak RSS is the process's own (ru_maxrss).

The reference is diffusers' examples/text_to_image/train_text_to_image_lora.py as the issue measured it on this
machine class with the same models and settings (0.89 s/step tiny; 3.75 s/step and 5.6 GiB SD1.5-shaped, fp32);
the ratios use those figures. With `--reference PATH` (that script: fetch it yourself, never commit it) it also
runs the reference side by side, on the same model folders, data (it reads the same folder through its
metadata.jsonl), resolution, rank, batch and precision, and the ratios use its figures from this run. Its time
per step is taken as ours is: inside its process, from the times its progress bar advances, over the steps after
the same 2 warm-up steps of a 2 + N step run; its peak RSS is that run's. (Until 2026-12-02 it was the wall time of
a 2 + N step run minus a 2-step run, over N: start-up varies by several seconds between runs (10-17 s for the
SD1.5-shaped model: page cache, imports, the datasets cache), which that method divided by only N, so the
reference's step came out 20-45% off in either direction.) It needs `datasets` and a torchvision that imports
beside your torch; when it cannot run, the table says why and keeps the quoted figures.

    python bench/bench_train.py [--repeats 3] [--steps 8] [--only tiny|sd15|sdxl] [--floor] [--reference SCRIPT]

SCRIPT is train_text_to_image_lora.py for tiny and sd15, train_text_to_image_lora_sdxl.py for sdxl (with --only
sdxl): the SDXL-shaped model (`sdlora tiny-model DIR --variant sdxl-shaped`, bf16 on disk) at 256 px, rank 16,
batch 1, gradient checkpointing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QUOTED_REFERENCE = {"tiny": (0.89, None), "sd15": (3.75, 5.6), "sdxl": (None, None)}  # s/step, peak RSS GiB (fp32, measured by the issue)
CONFIGS = {
    "tiny": dict(resolution=64, rank=4, alpha=4.0, batch_size=4),
    "sd15": dict(resolution=256, rank=16, alpha=16.0, batch_size=1),
    # SDXL's UNet at 256 px with gradient checkpointing: what fits this 24 GiB machine for both trainers
    "sdxl": dict(resolution=256, rank=16, alpha=16.0, batch_size=1, gradient_checkpointing=True),
}
FULL_BF16 = "bf16-full"  # --mixed-precision bf16 --full-bf16: LoRA weights in bf16 too (the reference's bf16 already is)
MODEL_VARIANTS = {"tiny": "tiny", "sd15": "sd15-shaped", "sdxl": "sdxl-shaped"}

# One training run in a child process: times each optimizer step through the metrics log's timestamps.
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from sdlora.config import TrainConfig
from sdlora.training.recipe import train
options = json.loads(sys.argv[1])
start = time.perf_counter()
train(TrainConfig.from_options(**options))
total = time.perf_counter() - start
lines = [json.loads(l) for l in Path(options["output_dir"], "metrics.jsonl").read_text().splitlines()]
times = [l["time"] for l in lines if "loss" in l]
warmup = 2
per_step = (times[-1] - times[warmup - 1]) / (len(times) - warmup)
print(json.dumps({"s_per_step": per_step, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "total_s": total}))
"""


def make_dataset(folder: Path, count: int, size: int, caption: str = "benchstyle, a square") -> Path:
    """`count` square images captioned `caption number N` (also bench/gpu_check.py's data)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), (235, 230, 220))
        ImageDraw.Draw(image).rectangle((size // 5, size // 5, size * 4 // 5, size * 4 // 5), fill=(40 * index % 255, 90, 160))
        image.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(f"{caption} number {index}")
    # the same captions for diffusers' reference script, which reads an `imagefolder` with metadata.jsonl
    lines = [json.dumps({"file_name": f"{index:03d}.png", "text": f"{caption} number {index}"}) for index in range(count)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# The floor: the bare UNet with the same LoRA, forward + loss + backward + AdamW on random latents of the trainer's
# shapes, at the same precision (frozen weights in bf16 under bf16 autocast, LoRA in fp32), nothing else in memory.
# No trainer can step faster than this without making the UNet itself faster; the ratio reference / floor is the
# most any caching or loop work can buy.
FLOOR_CHILD = r"""
import json, resource, sys, time, torch
from sdlora.training import network
from sdlora.models.loading import load_unet_streaming
from pathlib import Path
o = json.loads(sys.argv[1])
dtype = torch.bfloat16 if o["precision"] in ("bf16", "bf16-full") else torch.float32
unet = load_unet_streaming(Path(o["model"]) / "unet", dtype)
unet.requires_grad_(False)
lora_dtype = torch.bfloat16 if o["precision"] == "bf16-full" else torch.float32
params = network.add_lora(unet, network.unet_target_modules(unet, "attn"), o["rank"], o["alpha"], 0.0, dtype=lora_dtype)
if o.get("gradient_checkpointing"):
    unet.enable_gradient_checkpointing()
unet.train()
optimizer = torch.optim.AdamW(params, lr=1e-4)
vae_config = json.loads(Path(o["model"], "vae", "config.json").read_text())
side = o["resolution"] // 2 ** (len(vae_config["block_out_channels"]) - 1)  # the tiny VAE halves, SD's divides by 8
latents = torch.randn(o["batch_size"], unet.config.in_channels, side, side)
embeddings = torch.randn(o["batch_size"], 77, unet.config.cross_attention_dim)
timesteps = torch.randint(0, 1000, (o["batch_size"],))
added = None
if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and the 6 time ids
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(o["batch_size"], pooled), "time_ids": torch.tensor([[o["resolution"]] * 2 + [0, 0] + [o["resolution"]] * 2] * o["batch_size"], dtype=torch.float32)}
times = []
for step in range(o["steps"]):
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        prediction = unet(latents, timesteps, embeddings, added_cond_kwargs=added).sample
    torch.nn.functional.mse_loss(prediction.float(), latents).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
warm = times[2:]
print(json.dumps({"s_per_step": sum(warm) / len(warm), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_floor(model: str, settings: dict, precision: str, steps: int) -> dict:
    options = dict(model=model, precision=precision, steps=steps, **settings)
    result = subprocess.run(
        [sys.executable, "-c", FLOOR_CHILD, json.dumps(options)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_reference(script: Path, model_dir: Path, data: Path, out: Path, settings: dict, precision: str, steps: int) -> dict:
    """diffusers' reference script at the same settings: s/step from its progress bar's updates in a (2 + steps)-step
    run, the first 2 steps left out as ours are."""
    from bench_merge import run_measured

    def command(total: int, folder: Path) -> list[str]:
        return [sys.executable, str(script), "--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data),
                "--resolution", str(settings["resolution"]), "--center_crop", "--train_batch_size", str(settings["batch_size"]),
                "--rank", str(settings["rank"]), "--max_train_steps", str(total), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--mixed_precision", precision, "--seed", "0",
                "--output_dir", str(folder)] + (["--gradient_checkpointing"] if settings.get("gradient_checkpointing") else [])  # fmt: skip

    argv = command(2 + steps, out / "run")
    _, rss, output = run_measured([argv[0], "-c", STAMPING_LAUNCHER, str(SHIMS) if needs_torchvision_shim() else "", *argv[1:]])
    stamps = json.loads(next(line for line in output.splitlines() if line.startswith(STAMPS))[len(STAMPS) :])
    if len(stamps) != 2 + steps:
        raise SystemExit(f"the reference's progress bar advanced {len(stamps)} times in a {2 + steps}-step run")
    return {"s_per_step": (stamps[-1] - stamps[1]) / (len(stamps) - 2), "peak_rss_gib": rss}


SHIMS = Path(__file__).resolve().parent / "reference_shims"
STAMPS = "REFERENCE_STEP_TIMES "
# Runs the reference script with each update of its "Steps" progress bar timestamped (printed at exit), and, given
# the shims folder, with the torchvision stand-in importable while transformers and diffusers are told torchvision
# is absent (so they keep to their Pillow code paths instead of importing torchvision internals).
STAMPING_LAUNCHER = r"""
import atexit, json, runpy, sys, time
import tqdm.std
shims, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
stamps = []
update = tqdm.std.tqdm.update
def timed(self, n=1):
    if getattr(self, "desc", None) == "Steps":
        stamps.extend([time.perf_counter()] * n)
    return update(self, n)
tqdm.std.tqdm.update = timed
atexit.register(lambda: print("REFERENCE_STEP_TIMES " + json.dumps(stamps), flush=True))
if shims:
    import transformers.utils, transformers.utils.import_utils
    import diffusers.utils.import_utils
    for module in (transformers.utils, transformers.utils.import_utils, diffusers.utils.import_utils):
        for name in ("is_torchvision_available", "is_torchvision_v2_available"):
            if hasattr(module, name):
                setattr(module, name, lambda: False)
    diffusers.utils.import_utils._torchvision_available = False
    sys.path.insert(0, shims)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


@functools.cache
def needs_torchvision_shim() -> bool:
    """True when torchvision cannot be imported here (PyPI's does not import beside the CPU torch build)."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True)
    return probe.returncode != 0


def run_ours(model: str, data: Path, out: Path, settings: dict, precision: str, cache: str, steps: int) -> dict:
    options = dict(
        data_dir=str(data),
        output_dir=str(out),
        model=model,
        steps=steps,
        lr=1e-4,
        mixed_precision="bf16" if precision == FULL_BF16 else precision,
        full_bf16=precision == FULL_BF16,
        cache=cache,
        checkpoint_every=0,
        validate_every=0,
        sample_steps=1,
        seed=0,
        **settings,
    )
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run; the first 2 are warm-up")
    parser.add_argument("--only", choices=tuple(CONFIGS), default=None)
    parser.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "sdlora-bench"), help="folder for the SD1.5-shaped model and data"
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["no", "bf16"], help=f"no (fp32), bf16, fp16, {FULL_BF16} (bf16 with --full-bf16)"
    )
    parser.add_argument("--caches", nargs="+", default=["memory", "off"])
    parser.add_argument(
        "--floor", action="store_true", help="also time the bare UNet forward + backward + AdamW at the same shapes (the floor)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="path of diffusers' examples/text_to_image/train_text_to_image_lora.py, to run side by side",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    reference_notes = []
    for name, settings in CONFIGS.items():
        if args.only and name != args.only:
            continue
        # a model folder for both (ours would build `tiny` in memory; the reference needs files)
        model = str(work / MODEL_VARIANTS[name])
        if not Path(model, "model_index.json").is_file():
            subprocess.run([sys.executable, "-m", "sdlora", "tiny-model", model, "--variant", MODEL_VARIANTS[name]], check=True)
        data = make_dataset(work / f"data-{name}", count=8, size=settings["resolution"])
        for precision in args.precisions:
            reference = None
            if args.reference:
                try:
                    measured = []
                    for _ in range(args.repeats):
                        with tempfile.TemporaryDirectory(dir=work) as out:
                            ref_precision = "bf16" if precision == FULL_BF16 else precision
                            measured.append(
                                run_reference(args.reference, Path(model), data, Path(out), settings, ref_precision, args.steps)
                            )
                    reference = (
                        statistics.median(r["s_per_step"] for r in measured),
                        statistics.median(r["peak_rss_gib"] for r in measured),
                    )
                    rows.append((name, precision, "reference", reference[0], reference[1], 1.0, 1.0))
                    print(f"{name} {precision} reference: {reference[0]:.3f} s/step, {reference[1]:.2f} GiB", file=sys.stderr, flush=True)
                except SystemExit as failure:
                    last = str(failure).strip().splitlines()[-1] if str(failure).strip() else "failed"
                    reference_notes.append(
                        f"{name} {'fp32' if precision == 'no' else precision}: the reference did not run ({last[:200]}); ratios use the quoted figures"
                    )
            if args.floor:
                floors = [run_floor(model, settings, precision, args.steps) for _ in range(args.repeats)]
                floor_s = statistics.median(r["s_per_step"] for r in floors)
                floor_rss = statistics.median(r["peak_rss_gib"] for r in floors)
                ref_s, ref_rss = reference or QUOTED_REFERENCE[name]
                rows.append(
                    (
                        name,
                        precision,
                        "UNet alone (floor)",
                        floor_s,
                        floor_rss,
                        ref_s / floor_s if ref_s else None,
                        floor_rss / ref_rss if ref_rss else None,
                    )
                )
                print(f"{name} {precision} floor: {floor_s:.3f} s/step, {floor_rss:.2f} GiB", file=sys.stderr, flush=True)
            for cache in args.caches:
                results = []
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory(dir=work) as out:
                        results.append(run_ours(model, data, Path(out) / "run", settings, precision, cache, args.steps))
                s_per_step = statistics.median(r["s_per_step"] for r in results)
                rss = statistics.median(r["peak_rss_gib"] for r in results)
                ref_s, ref_rss = reference or QUOTED_REFERENCE[name]
                rows.append(
                    (name, precision, cache, s_per_step, rss, ref_s / s_per_step if ref_s else None, rss / ref_rss if ref_rss else None)
                )
                print(f"{name} {precision} cache={cache}: {s_per_step:.3f} s/step, {rss:.2f} GiB", file=sys.stderr, flush=True)
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.2f} (2 cores); {args.repeats} runs each, median; {args.steps} steps, first 2 warm-up\n"
    )
    print("| model | precision | cache | s/step | steps/s | peak RSS | speed vs reference | memory vs reference |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, precision, cache, s_per_step, rss, speed, memory in rows:
        memory_text = f"{memory:.2f}x" if memory is not None else "n/a"
        speed_text = f"{speed:.2f}x" if speed is not None else "n/a"
        print(
            f"| {name} | {'fp32' if precision == 'no' else precision} | {cache} | {s_per_step:.3f} | {1 / s_per_step:.2f} | {rss:.2f} GiB | {speed_text} | {memory_text} |"
        )
    if args.reference and needs_torchvision_shim():
        print("\nthe reference ran with bench/reference_shims/torchvision (Pillow transforms): torchvision does not import here")
    for note in reference_notes:
        print(f"\n{note}")
    if not args.reference or reference_notes:
        print(
            "\nreference: the issue's measurement of diffusers' train_text_to_image_lora.py on this machine class (fp32): tiny 0.89 s/step; SD1.5-shaped 3.75 s/step, 5.6 GiB"
        )


if __name__ == "__main__":
    main()
