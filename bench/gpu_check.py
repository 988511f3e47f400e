"""GPU check: sdlora against diffusers' LoRA training step on the SD1.5- and SDXL-shaped models, one table, offline.

    python bench/gpu_check.py            # CUDA: SD1.5-shaped 512 px rank 16, SDXL-shaped 1024 px rank 32, bf16 and fp16
    python bench/gpu_check.py --quick    # CPU: the tiny SD1 and SDXL models at 64 px, fp32 and bf16, 2 steps each

Builds the models from configs (`sdlora tiny-model`, random weights) and a small image set in a temporary folder,
then trains each (model, precision) with sdlora and with the reference, each run in a process of its own, batch 1,
AdamW at lr 1e-4, the same images and captions. For each run it reports, per phase:

- setup: loading the model, adding LoRA, building the optimizer (sdlora: also filling its latent/embedding cache);
- step: the median seconds per optimizer step after the warm-up steps, images/s (batch / s per step);
- sampling: one image at the run's resolution, `--sample-steps` denoising steps, with the trained LoRA;

with peak `torch.cuda.max_memory_allocated` per phase (the counter reset at the start of each), and the ratios
sdlora / reference from the same run of this script. On the CPU (`--quick`) memory is "n/a": the process's peak RSS
cannot be reset between phases. Then it loads each LoRA saved into a fresh diffusers pipeline
(`load_lora_weights`), draws one image and checks that it is finite.

The reference. diffusers' examples/text_to_image/train_text_to_image_lora.py and train_text_to_image_lora_sdxl.py
are not part of the diffusers package and the GPU machine has no internet, so `reference_step` below is a minimal
re-implementation of what those scripts do per step, written from reading them (not copied): frozen UNet, VAE and
text encoder(s) cast to the weight dtype (SDXL: the VAE stays fp32, as the script keeps it without
--pretrained_vae_model_name_or_path); a peft `LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"])` added with `unet.add_adapter`, LoRA parameters cast to fp32
under fp16 only (`cast_training_params`); AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8); per step the VAE
encodes the batch (no cache), DDPM noise at a uniform random timestep, the text encoder(s) run (SDXL: penultimate
hidden states of both, pooled output of the second, the 6 time ids), the UNet's forward under autocast (as
accelerate's prepared model runs it), MSE on epsilon in fp32, backward (through a GradScaler under fp16), gradient
clipping at 1.0, optimizer step. Its sampling is the scripts' validation: a pipeline around the trained models in
memory, under autocast (theirs is `torch.autocast(device)`, fp16 on CUDA whatever the weights; here the weight
dtype, which also runs on the CPU) (sdlora's: its own end-of-run sample, also in memory). Its
saved LoRA goes through the same diffusers load check as sdlora's. Differences from running the scripts themselves: no accelerate
wrapper, no `datasets` loader (images are read with Pillow), the model is loaded straight in the weight dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the benchmarks share their data: run as a script, this folder is on sys.path
from bench_train import make_dataset

# nothing here may reach the network; torch, diffusers and sdlora are imported inside the functions, after these are set
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

RESULT = "GPU_CHECK_RESULT "  # prefix of the child process's JSON result line
PROMPT = "benchstyle, a square"
# name: (tiny-model variant, resolution, rank); full mode on CUDA, --quick on the CPU
SHAPES = {
    "sd15": ("sd15-shaped", 512, 16),
    "sdxl": ("sdxl-shaped", 1024, 32),
}
QUICK_SHAPES = {
    "sd15": ("tiny", 64, 4),  # 64 px: the least sdlora trains at
    "sdxl": ("sdxl", 64, 4),
}
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the reference scripts' LoRA targets (sdlora's --preset attn: the same)


# ---------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Phase:
    """Time and peak CUDA memory of one phase: `with Phase(device) as phase: ...`, then phase.seconds, phase.peak_gib."""

    def __init__(self, device: str):
        self.device, self.seconds, self.peak_gib = device, 0.0, None

    def __enter__(self) -> Phase:
        import torch

        synchronize(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def warm_start(device: str) -> None:
    """What both trainers need before their setup phase, done outside it: the heavy imports and the CUDA context."""
    import diffusers.pipelines  # noqa: F401 - imported for its cost, not its names
    import torch
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401

    torch.zeros(1, device=device)
    synchronize(device)


def median_step(step_times: list[float], warmup: int) -> float:
    return statistics.median(step_times[warmup:] or step_times)


def image_is_finite(image) -> bool:
    """An output_type="np" image (a PIL one would hide NaNs: they become 0 in the uint8 conversion)."""
    import numpy as np

    return image.size > 0 and bool(np.isfinite(image).all())


# ---------------------------------------------------------------- sdlora


class _MeteredValidator:
    """Stands in for the run's validator: the end-of-run sample is the sampling phase, and what ran before it the step phase."""

    def __init__(self, validator, device: str, phases: dict):
        self._validator, self._device, self._phases = validator, device, phases

    def __getattr__(self, name):
        return getattr(self._validator, name)

    def evaluate(self, metrics, step: int) -> None:
        import torch

        synchronize(self._device)
        self._phases["step_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if self._device == "cuda" else None
        with Phase(self._device) as phase:
            self._validator.evaluate(metrics, step)
        self._phases["sample"] = phase


def run_sdlora(job: dict) -> dict:
    """One sdlora training run: setup, the steps, the end-of-run sample, saving; then the diffusers load check."""
    import torch

    from sdlora.config import TrainConfig
    from sdlora.training import recipe

    device = job["device"]
    warm_start(device)
    config = TrainConfig.from_options(
        data_dir=job["data"], output_dir=job["out"], model=job["model"], resolution=job["resolution"], rank=job["rank"],
        alpha=float(job["rank"]), batch_size=1, steps=job["warmup"] + job["steps"], lr=1e-4, mixed_precision=job["precision"],
        checkpoint_every=0, validate_every=0, validation_prompts=[PROMPT], sample_steps=job["sample_steps"], seed=0,
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Phase(device) as setup_phase:
        run = recipe.setup(config)
    phases: dict = {}
    run.validator = _MeteredValidator(run.validator, device, phases)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    recipe.run_steps(run)
    lora_file = recipe.save_outputs(run)
    plan = {phase.name: phase.total / 2**30 for phase in run.plan.phases}  # what the run's memory plan said
    stamps = [line["time"] for line in map(json.loads, Path(job["out"], "metrics.jsonl").read_text().splitlines()) if "loss" in line]
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]  # the metrics log's wall-clock stamps, one per step
    del run
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "setup_s": setup_phase.seconds, "setup_peak_gib": setup_phase.peak_gib,
        "step_s": median_step(step_times, max(job["warmup"] - 1, 0)), "step_peak_gib": phases["step_peak_gib"],
        "sample_s": phases["sample"].seconds, "sample_peak_gib": phases["sample"].peak_gib,
        "loads_in_diffusers": diffusers_load_check(job, lora_file), "plan": plan,
    }  # fmt: skip


def diffusers_load_check(job: dict, lora_file: Path) -> bool:
    """The saved LoRA loads into a fresh diffusers pipeline (as a UNet adapter) and the pipeline draws a finite image
    (a few denoising steps: this is a check, not a measurement)."""
    import torch
    from diffusers import DiffusionPipeline

    dtype = weight_dtype(job["precision"])
    pipe = DiffusionPipeline.from_pretrained(job["model"], torch_dtype=dtype).to(job["device"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    adapters = pipe.get_list_adapters()
    generator = torch.Generator(job["device"]).manual_seed(0)
    with torch.no_grad():
        image = pipe(
            PROMPT, num_inference_steps=min(job["sample_steps"], 4), height=job["resolution"], width=job["resolution"],
            generator=generator, output_type="np",
        ).images[0]  # fmt: skip
    return bool(adapters.get("unet")) and image_is_finite(image)


# ---------------------------------------------------------------- the reference (diffusers' example scripts' step)


def weight_dtype(precision: str):
    import torch

    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_images(data: Path, resolution: int):
    """(pixel tensors in [-1, 1], captions): resize the short side, centre crop, as the scripts' transforms with --center_crop."""
    import numpy as np
    import torch
    from PIL import Image

    pixels, captions = [], []
    for path in sorted(data.glob("*.png")):
        image = Image.open(path).convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        captions.append(path.with_suffix(".txt").read_text().strip())
    return pixels, captions


def run_reference(job: dict) -> dict:
    """The reference scripts' setup, step and final inference on the same model folder and images."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiffusionPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    device, model, precision = job["device"], job["model"], job["precision"]
    dtype = weight_dtype(precision)
    sdxl = Path(model, "text_encoder_2").is_dir()
    warm_start(device)
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Phase(device) as setup_phase:
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        tokenizers = [AutoTokenizer.from_pretrained(model, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)]
        if sdxl:
            tokenizers.append(AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", torch_dtype=dtype))
        vae_dtype = torch.float32 if sdxl else dtype  # the SDXL script keeps its VAE in fp32 (NaNs in fp16 otherwise)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=vae_dtype).to(device)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(device)
        for module in (unet, vae, *encoders):
            module.requires_grad_(False)
        encoders = [encoder.to(device) for encoder in encoders]
        unet.add_adapter(LoraConfig(r=job["rank"], lora_alpha=job["rank"], init_lora_weights="gaussian", target_modules=TARGETS))
        if precision == "fp16":
            cast_training_params(unet, dtype=torch.float32)
        lora_parameters = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora_parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
        pixels, captions = load_images(Path(job["data"]), job["resolution"])
        token_ids = [
            [tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids for caption in captions]
            for tokenizer in tokenizers
        ]  # fmt: skip
    unet.train()
    autocast = torch.autocast(device, dtype=dtype, enabled=precision != "no")
    step_times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(job["warmup"] + job["steps"]):
        index = step % len(pixels)
        synchronize(device)
        start = time.perf_counter()
        latents = vae.encode(pixels[index][None].to(device, vae_dtype)).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = [ids_of[index].to(device) for ids_of in token_ids]
        if sdxl:
            outputs = [encoder(i, output_hidden_states=True, return_dict=False) for encoder, i in zip(encoders, ids)]
            embeddings = torch.cat([output[-1][-2] for output in outputs], dim=-1)
            size = job["resolution"]
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
            added = {"text_embeds": outputs[-1][0], "time_ids": time_ids}
        else:
            embeddings, added = encoders[0](ids[0], return_dict=False)[0], None
        with autocast:
            prediction = unet(noisy, timesteps, embeddings, added_cond_kwargs=added, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
            optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the scripts read the loss every step (train_loss += avg_loss.item())
        step_times.append(time.perf_counter() - start)
    step_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    with Phase(device) as sample_phase:  # the scripts' log_validation: a pipeline around the trained models in memory
        trained = dict(unet=unet, vae=vae, text_encoder=encoders[0]) | (dict(text_encoder_2=encoders[1]) if sdxl else {})
        pipe = DiffusionPipeline.from_pretrained(model, **trained, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad(), autocast:
            pipe(PROMPT, num_inference_steps=job["sample_steps"], height=job["resolution"], width=job["resolution"], output_type="np")
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        out, unet_lora_layers=lora_layers, safe_serialization=True
    )
    del pipe, trained, unet, vae, encoders, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "setup_s": setup_phase.seconds, "setup_peak_gib": setup_phase.peak_gib,
        "step_s": median_step(step_times, job["warmup"]), "step_peak_gib": step_peak,
        "sample_s": sample_phase.seconds, "sample_peak_gib": sample_phase.peak_gib,
        "loads_in_diffusers": diffusers_load_check(job, out / "pytorch_lora_weights.safetensors"),
    }  # fmt: skip


# ---------------------------------------------------------------- the table


def run_job(job: dict) -> dict:
    return (run_sdlora if job["trainer"] == "sdlora" else run_reference)(job)


def run_in_process(job: dict) -> dict:
    """--quick: one job in this process (a process per job costs more start-up than the tiny run); a failure becomes the row's note."""
    try:
        return run_job(job)
    except Exception as failure:  # noqa: BLE001 - reported in the table, and the script then exits non-zero
        return {"error": f"{type(failure).__name__}: {failure}".splitlines()[0][:160]}


def run_child(job: dict) -> dict:
    """One job in a process of its own (clean memory counters, nothing shared); a failure becomes the row's note."""
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:160]}
    return json.loads(lines[-1][len(RESULT) :])


def _gib(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ratio(ours, reference) -> str:
    return "n/a" if ours is None or not reference else f"{ours / reference:.2f}x"


def print_table(rows: list[tuple[str, str, str, dict]]) -> None:
    """One row per run; the ratio columns are sdlora / reference of the same model and precision (lower is better)."""
    by_key = {(model, precision, trainer): result for model, precision, trainer, result in rows}
    print("| model | precision | trainer | setup s | setup GiB | s/step | images/s | step GiB | sample s | sample GiB "
          "| s/step vs ref | step GiB vs ref | setup GiB vs ref | sample GiB vs ref | LoRA loads, image finite |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for model, precision, trainer, result in rows:
        label = "fp32" if precision == "no" else precision
        if "error" in result:
            print(f"| {model} | {label} | {trainer} | failed: {result['error']} |")
            continue
        reference = by_key.get((model, precision, "reference"), {})
        ratios = [_ratio(result[k], reference.get(k)) for k in ("step_s", "step_peak_gib", "setup_peak_gib", "sample_peak_gib")]
        print(
            f"| {model} | {label} | {trainer} | {result['setup_s']:.1f} | {_gib(result['setup_peak_gib'])} | {result['step_s']:.3f} "
            f"| {1 / result['step_s']:.2f} | {_gib(result['step_peak_gib'])} | {result['sample_s']:.1f} | {_gib(result['sample_peak_gib'])} "
            f"| {' | '.join(ratios)} | {'yes' if result['loads_in_diffusers'] else 'NO'} |"
        )


def print_plan_table(rows: list[tuple[str, str, str, dict]]) -> None:
    """sdlora's memory plan (printed at its start) against the peaks measured in the same run."""
    print("| model | precision | plan setup GiB | measured | plan step GiB | measured | plan sample GiB | measured |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, precision, trainer, result in rows:
        if trainer != "sdlora" or "error" in result:
            continue
        plan = result["plan"]
        cells = [
            f"{plan[name]:.3f} | {_gib(result[key])}" if name in plan else f"n/a | {_gib(result[key])}"
            for name, key in (("setup (caching)", "setup_peak_gib"), ("training step", "step_peak_gib"), ("sampling", "sample_peak_gib"))
        ]
        print(f"| {model} | {'fp32' if precision == 'no' else precision} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models at 64 px on the CPU, fp32 and bf16, 2 steps each (what the test runs)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 12; --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 3; --quick 1)")
    parser.add_argument("--sample-steps", type=int, default=None, help="denoising steps of the sampling phase (default 20; --quick 2)")
    parser.add_argument("--only", choices=tuple(SHAPES), default=None)
    parser.add_argument("--work", default=None, help="folder for the models and images (default: a temporary folder, removed)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT + json.dumps(run_job(json.loads(args.child))), flush=True)
        return

    import diffusers
    import torch

    from sdlora.models.loading import write_tiny_model

    started = time.perf_counter()
    device = "cpu" if args.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --quick for the CPU smoke run")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    precisions = ("no", "bf16") if args.quick else ("bf16", "fp16")  # fp16 on the CPU: emulated, too slow for the test
    steps = args.steps or (1 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    sample_steps = args.sample_steps or (2 if args.quick else 20)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}, diffusers {diffusers.__version__}; {warmup} warm-up + {steps} timed steps, batch 1")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        rows = []
        for model_name, (variant, resolution, rank) in shapes.items():
            if args.only and model_name != args.only:
                continue
            model = Path(work, variant)
            write_tiny_model(model, variant=variant)
            data = make_dataset(Path(work, f"data-{model_name}"), count=8, size=resolution, caption=PROMPT)
            for precision in precisions:
                for trainer in ("reference", "sdlora"):
                    job = dict(trainer=trainer, device=device, model=str(model), data=str(data), out=str(Path(work, f"{model_name}-{precision}-{trainer}")),
                               resolution=resolution, rank=rank, precision=precision, steps=steps, warmup=warmup, sample_steps=sample_steps)  # fmt: skip
                    rows.append((model_name, precision, trainer, run_in_process(job) if args.quick else run_child(job)))
                    print(f"{model_name} {precision} {trainer}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print("\nreference: a re-implementation of diffusers' train_text_to_image_lora(_sdxl).py's step (see this script's docstring)")
    print(f"rank {', '.join(f'{n} {r[2]} at {r[1]} px' for n, r in shapes.items())}; sampling: {sample_steps} steps, one image\n")
    print_table(rows)
    print()
    print_plan_table(rows)
    print(f"\nelapsed: {time.perf_counter() - started:.0f} s")
    if any("error" in result or not result["loads_in_diffusers"] for *_, result in rows):
        raise SystemExit("a run failed or its LoRA did not give a finite image in diffusers (see the table)")


if __name__ == "__main__":
    main()
