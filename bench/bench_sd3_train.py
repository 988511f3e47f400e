"""SD3 training speed and memory: sdlora against diffusers' `train_dreambooth_lora_sd3.py` and against the bare
transformer's forward + backward (the floor), as a table (median of `--repeats` runs, each its own process).

The issue's setting: the sd3-shaped model (SD3.5 Medium's transformer, SD3's VAE, text encoders of SD3's widths cut
to 2 layers; `sdlora tiny-model DIR --variant sd3-shaped`) at 256 px, rank 16, batch 1, the attention preset (both
streams' projections and attn2: diffusers' default `--lora_layers` plus attn2's four, passed to it so both adapt the
same 243 layers), latents cached in both, T5 on in both (diffusers' script always loads it), prompts of 77 tokens in
both. s/step is taken inside each process over the steps after 2 warm-up steps (ours from metrics.jsonl, the
reference from its progress bar, the floor from its own clock); peak RSS is each process's own. The reference script
is fetched by you (never committed) and runs with `bench/reference_shims/torchvision` where torchvision does not
import. `--model tiny-sd3` runs the same on the tiny model (a check that the script works, in a minute).

    python bench/bench_sd3_train.py --reference train_dreambooth_lora_sd3.py [--model sd3-shaped|tiny-sd3]
        [--repeats 3] [--steps 5] [--precision no|bf16]

The issue's goals: >= 1.2x the reference's steps/s at <= 0.6x its peak memory, and within 5% of the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import run_measured  # noqa: E402
from bench_train import CHILD, SHIMS, STAMPING_LAUNCHER, STAMPS, make_dataset, needs_torchvision_shim  # noqa: E402

LAYERS = "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v"
LAYERS += ",attn2.to_k,attn2.to_out.0,attn2.to_q,attn2.to_v"  # SD3.5 Medium's second attention, in our attn preset
CAPTION = "benchstyle, a square"

# The floor: the transformer alone with the same LoRA layers, forward + loss + backward + AdamW on random latents and
# text of the trainer's shapes (77 CLIP + 77 T5 tokens, the pooled vector) at the same precision.
FLOOR_CHILD = r"""
import json, resource, sys, time, torch
from pathlib import Path
from diffusers import SD3Transformer2DModel
from sdlora.training import network
o = json.loads(sys.argv[1])
dtype = torch.bfloat16 if o["precision"] == "bf16" else torch.float32
transformer = SD3Transformer2DModel.from_pretrained(o["model"], subfolder="transformer", torch_dtype=dtype)
transformer.requires_grad_(False)
params = network.add_lora(transformer, network.unet_target_modules(transformer, "attn"), o["rank"], o["rank"])
transformer.train()
optimizer = torch.optim.AdamW(params, lr=1e-4)
vae_config = json.loads((Path(o["model"]) / "vae" / "config.json").read_text())
side = o["resolution"] // 2 ** (len(vae_config["block_out_channels"]) - 1)  # the tiny VAE halves, SD3's divides by 8
latents = torch.randn(1, transformer.config.in_channels, side, side)
text = torch.randn(1, 154, transformer.config.joint_attention_dim)
pooled = torch.randn(1, transformer.config.pooled_projection_dim)
times = []
for step in range(o["steps"]):
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        prediction = transformer(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text, pooled_projections=pooled).sample
    torch.nn.functional.mse_loss(prediction.float(), latents).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
warm = times[2:]
print(json.dumps({"s_per_step": sum(warm) / len(warm), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _child(code: str, options: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(options)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_ours(model: Path, data: Path, out: Path, resolution: int, rank: int, precision: str, steps: int) -> dict:
    options = dict(
        data_dir=str(data), output_dir=str(out), model=str(model), steps=steps, lr=1e-4, mixed_precision=precision,
        cache="memory", checkpoint_every=0, validate_every=0, samples=False, seed=0, resolution=resolution, rank=rank,
        alpha=float(rank), batch_size=1, preset="attn", buckets=False, t5_max_length=77,
    )  # fmt: skip
    return _child(CHILD, options)


def run_floor(model: Path, resolution: int, rank: int, precision: str, steps: int) -> dict:
    return _child(FLOOR_CHILD, dict(model=str(model), resolution=resolution, rank=rank, precision=precision, steps=steps))


def run_reference(script: Path, model: Path, data: Path, out: Path, resolution: int, rank: int, precision: str, steps: int) -> dict:
    """diffusers' script at the same settings: s/step from its progress bar in a (2 + steps)-step run."""
    images = out / "instance"
    images.mkdir(parents=True)
    for image in data.glob("*.png"):  # DreamBooth reads a folder of images and one prompt
        (images / image.name).symlink_to(image)
    argv = [sys.executable, str(script), "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", CAPTION, "--resolution", str(resolution), "--center_crop", "--train_batch_size", "1",
            "--rank", str(rank), "--lora_layers", LAYERS, "--max_train_steps", str(2 + steps), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--mixed_precision",
            precision, "--seed", "0", "--cache_latents", "--max_sequence_length", "77", "--output_dir", str(out / "run")]  # fmt: skip
    _, rss, output = run_measured([argv[0], "-c", STAMPING_LAUNCHER, str(SHIMS) if needs_torchvision_shim() else "", *argv[1:]])
    stamps = json.loads(next(line for line in output.splitlines() if line.startswith(STAMPS))[len(STAMPS) :])
    if len(stamps) != 2 + steps:
        raise SystemExit(f"the reference's progress bar advanced {len(stamps)} times in a {2 + steps}-step run")
    return {"s_per_step": (stamps[-1] - stamps[1]) / (len(stamps) - 2), "peak_rss_gib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py")
    parser.add_argument("--model", choices=("sd3-shaped", "tiny-sd3"), default="sd3-shaped")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run after 2 warm-up steps")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sdlora-bench"))
    args = parser.parse_args()
    resolution, rank = (256, 16) if args.model == "sd3-shaped" else (64, 4)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / args.model
    if not (model / "model_index.json").is_file():
        variant = "sd3-shaped" if args.model == "sd3-shaped" else "sd3"
        subprocess.run([sys.executable, "-m", "sdlora", "tiny-model", str(model), "--variant", variant], check=True)
    data = make_dataset(work / f"data-sd3-{resolution}", count=8, size=resolution, caption=CAPTION)
    results: dict[str, list[dict]] = {"floor": [], "sdlora": []} | ({"reference": []} if args.reference else {})
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load touches each alike
        results["floor"].append(run_floor(model, resolution, rank, args.precision, 2 + args.steps))
        with tempfile.TemporaryDirectory(dir=work) as out:
            results["sdlora"].append(run_ours(model, data, Path(out) / "run", resolution, rank, args.precision, 2 + args.steps))
        if args.reference:
            with tempfile.TemporaryDirectory(dir=work) as out:
                results["reference"].append(
                    run_reference(args.reference.resolve(), model, data, Path(out), resolution, rank, args.precision, args.steps)
                )
        print({name: f"{runs[-1]['s_per_step']:.2f} s/step" for name, runs in results.items()}, file=sys.stderr, flush=True)
    median = {name: (statistics.median(r["s_per_step"] for r in runs), statistics.median(r["peak_rss_gib"] for r in runs))
              for name, runs in results.items()}  # fmt: skip
    print(f"{args.model}, {resolution} px, rank {rank}, batch 1, {'fp32' if args.precision == 'no' else 'bf16'}, T5 on, "
          f"median of {args.repeats} runs of {args.steps} timed steps; load average at the end {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| trainer | s/step | steps/s | peak RSS GiB | speed vs reference | memory vs reference | floor / this |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference = median.get("reference")
    for name, (seconds, rss) in median.items():
        speed = f"{reference[0] / seconds:.2f}x" if reference else "n/a"
        memory = f"{rss / reference[1]:.2f}x" if reference else "n/a"
        print(f"| {name} | {seconds:.2f} | {1 / seconds:.3f} | {rss:.2f} | {speed} | {memory} | {median['floor'][0] / seconds:.2f} |")


if __name__ == "__main__":
    main()
