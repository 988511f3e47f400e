"""`train(config) -> Path`: the one training loop, read top to bottom: setup -> (resume) -> steps -> outputs.

Each optimizer step: take `grad_accum` micro-batches (each from one aspect bucket), turn images into latents
(cached distribution or VAE), captions into embeddings (cached or text encoder), compute the noise-prediction
loss, backpropagate into the LoRA parameters only, clip, step. Checkpoints, validation and the final files are
helpers below the loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cache, checkpoint, data, lora, objective, report, validation
from .atomic import check_writable_target, remove_leftover_temporaries
from .cache import EmbeddingCache, LatentCache
from .config import TrainConfig
from .metrics import MetricsLogger, progress_bar
from .lorafile import read_lora
from .models import load_pipeline

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class TrainingDiverged(ValueError):
    """The loss or the gradients stopped being finite."""


@dataclass
class Run:
    """Everything the loop touches, built once by `_setup`."""

    config: TrainConfig
    accelerator: object
    pipe: object
    unet: torch.nn.Module  # possibly wrapped by accelerate (DDP)
    text_encoder: torch.nn.Module
    noise_scheduler: object
    records: list
    val_records: list
    sampler: data.BucketBatchSampler
    buckets: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: dict[str, torch.nn.Parameter]
    latent_cache: LatentCache | None
    embedding_cache: EmbeddingCache | None
    generator: torch.Generator  # noise, timesteps and latent samples
    rng: random.Random  # flips, crops, caption dropout and shuffling
    objective: objective.ObjectiveConfig
    weight_dtype: torch.dtype
    held_out: list | None = None  # validation.HeldOut per held-out image, filled at the first validation


def train(config: TrainConfig) -> Path:
    """Train a LoRA as `config` says; returns the path of the diffusers-format file in `config.output_dir`."""
    from accelerate import Accelerator

    config.validate()
    out = Path(config.output_dir)
    # several processes without CUDA (torchrun/accelerate launch on CPUs) need accelerate's CPU mode for gloo
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps its settings per process: a second train() (a notebook) with another precision would be refused.
    # Only the accelerator-level state is cleared; the process group (PartialState) stays.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=multi_cpu)
    state = checkpoint.TrainState(step=0, epoch=0, batch_in_epoch=0)
    with _explain_full_disk(out, lambda: state.step):
        run = _setup(config, accelerator)
        metrics = MetricsLogger(out, enabled=accelerator.is_main_process)
        state = _start_or_resume(run, metrics)
        return _loop(run, metrics, state)


def _loop(run: Run, metrics: MetricsLogger, state: checkpoint.TrainState) -> Path:
    config, accelerator, out = run.config, run.accelerator, Path(run.config.output_dir)
    if state.step == 0 and run.val_records:
        metrics.log(0, val_loss=validation.validation_loss(run))  # the base model's loss, to compare the LoRA against
    bar = progress_bar(config.steps, state.step, disable=not accelerator.is_local_main_process)
    batches = _batches(run, state)
    with contextlib.closing(bar):  # closed on errors too, so an error message starts on a line of its own
        while state.step < config.steps:
            loss, grad_norm = _optimizer_step(run, batches, state)
            state.step += 1
            lr = run.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            metrics.log(state.step, loss=loss, lr=lr, grad_norm=grad_norm, epoch=state.epoch)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < config.steps:
                _save_checkpoint(run, state)
            if config.validate_every and state.step % config.validate_every == 0 and state.step < config.steps:
                validation.validate(run, metrics, state.step)
    _save_checkpoint(run, state)
    validation.validate(run, metrics, state.step)
    if accelerator.num_processes > 1:
        metrics.log(state.step, processes_in_sync=_check_processes_in_sync(run))
    metrics.close()
    return _save_outputs(run, out)


# ---------------------------------------------------------------- setup


def _setup(config: TrainConfig, accelerator) -> Run:
    """Load the model and data, add LoRA, build the optimizer, schedule and caches."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    out = Path(config.output_dir)
    check_writable_target(out, is_dir=True)  # fail before the slow parts; nothing is created until data and model load
    torch.manual_seed(config.seed)
    records = data.find_images(config.data_dir, caption=config.caption, trigger=config.trigger)
    records, val_records = data.split_validation(records, config.val_split, config.seed)
    # frozen base weights in half precision under mixed precision; LoRA parameters stay fp32 (lora.add_lora)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipe = load_pipeline(config.model, dtype=weight_dtype, config=config.model_config, allow_pickle=config.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet_params = lora.add_lora(pipe.unet, lora.unet_target_modules(pipe.unet, config.preset), config.rank, config.alpha, config.dropout)
    param_groups = [{"params": unet_params, "lr": config.lr}]
    if config.train_text_encoder:
        te_params = lora.add_lora(pipe.text_encoder, lora.text_encoder_target_modules(pipe.text_encoder), config.rank, config.alpha, config.dropout)
        param_groups.append({"params": te_params, "lr": config.text_encoder_lr or config.lr / 2})
    if config.init_lora:  # a LoRA trained further; a resumed checkpoint later overrides it
        state = read_lora(config.init_lora, allow_pickle=config.allow_pickle)
        state.check_finite(config.init_lora)
        lora.load_state_into(state, pipe.unet, pipe.text_encoder if config.train_text_encoder else None, label=config.init_lora)
    if accelerator.is_main_process:
        report.check_output_dir(out)
        remove_leftover_temporaries(out)  # what a killed run was writing when it died
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            pipe.text_encoder.gradient_checkpointing_enable()
    trainable = {f"unet.{n}": p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    trainable.update({f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters() if p.requires_grad})
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    # stepped once per optimizer step by the loop, not prepared: accelerate would step it once per process
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)
    if config.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(pipe.unet, pipe.text_encoder, optimizer)
    else:
        (unet, optimizer), text_encoder = accelerator.prepare(pipe.unet, optimizer), pipe.text_encoder
    choices = data.training_sizes(config.resolution, config.buckets)
    record_buckets = [data.assign_bucket(r.width, r.height, choices) for r in records]
    sampler = data.BucketBatchSampler(record_buckets, config.batch_size, seed=config.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    latent_cache, embedding_cache = cache.build_caches(config, pipe, accelerator.device, out)
    generator = torch.Generator().manual_seed(config.seed + 1000 * accelerator.process_index)
    rng = random.Random(config.seed + 1000 * accelerator.process_index)
    objective_config = objective.ObjectiveConfig(config.prediction_type, config.snr_gamma, config.noise_offset, config.caption_dropout)
    run = Run(config, accelerator, pipe, unet, text_encoder, noise_scheduler, records, val_records, sampler, record_buckets, optimizer, lr_scheduler, trainable, latent_cache, embedding_cache, generator, rng, objective_config, weight_dtype)
    cache.fill_caches(config, records, record_buckets, latent_cache, embedding_cache, show=accelerator.is_local_main_process)
    return run


# ---------------------------------------------------------------- one step


def _batches(run: Run, state: checkpoint.TrainState):
    """Batches of dataset indices in a seeded order, from the resume position on; advances state's epoch/position."""
    while True:
        run.sampler.set_epoch(state.epoch)
        epoch_batches = list(run.sampler)
        while state.batch_in_epoch < len(epoch_batches):
            batch = epoch_batches[state.batch_in_epoch]
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def _optimizer_step(run: Run, batches, state: checkpoint.TrainState) -> tuple[float, float]:
    """grad_accum micro-batches, clip, step; raises TrainingDiverged on a non-finite loss or gradient."""
    config, accelerator = run.config, run.accelerator
    # randomness is a function of (seed, step, process): a resumed run and every rank draw exactly what they would have
    step_seed = (config.seed * 1_000_003 + (state.step + 1) * 1_009 + accelerator.process_index) % 2**63
    run.generator.manual_seed(step_seed)
    run.rng.seed(step_seed)
    torch.manual_seed(step_seed)  # LoRA dropout draws from the global generator
    total = 0.0
    for micro in range(config.grad_accum):
        indices = next(batches)
        latents, embeddings = _encode_batch(run, indices)
        sync = contextlib.nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(run.unet)
        with sync, accelerator.autocast():
            loss = objective.diffusion_loss(run.unet, run.noise_scheduler, latents, embeddings, run.objective, generator=run.generator)
        if not torch.isfinite(loss):
            raise TrainingDiverged(_diverged_message(state.step + 1, f"the loss became {loss.item()}", run))
        accelerator.backward(loss / config.grad_accum)
        total += loss.item() / config.grad_accum
    params = list(run.trainable.values())
    grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf))  # inf: measure, do not clip
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(_diverged_message(state.step + 1, f"the gradient norm became {grad_norm}", run))
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@contextlib.contextmanager
def _explain_full_disk(out: Path, step):
    """A full disk anywhere in a run (cache, checkpoint, samples, outputs) becomes one line that says what to do."""
    try:
        yield
    except OSError as err:
        if err.errno not in checkpoint.DISK_FULL or isinstance(err, checkpoint.DiskFullError):
            raise
        last = checkpoint.latest_checkpoint(out / "checkpoints")
        then = f"the last complete checkpoint is {last}: free space, then rerun with --resume latest" if last else "no checkpoint was written yet: free space, then run again"
        where = f" writing {err.filename}" if err.filename else ""
        raise checkpoint.DiskFullError(err.errno, f"no space left on device{where} at step {step()}; {then}") from err


def _diverged_message(step: int, what: str, run: Run) -> str:
    found = checkpoint.latest_checkpoint(Path(run.config.output_dir) / "checkpoints")
    kept = f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"
    hint = "use --mixed-precision bf16 instead of fp16, " if run.config.mixed_precision == "fp16" else ""
    return f"training stopped at step {step}: {what}; {kept}. Try {hint}a lower --lr (now {run.config.lr:g}) or --max-grad-norm 1"


def _encode_batch(run: Run, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (sampled from the cached or fresh VAE distribution) and caption embeddings for one micro-batch."""
    config, device = run.config, run.accelerator.device
    means, stds, pixels, captions = [], [], [], []
    for index in indices:
        record, size = run.records[index], run.buckets[index]
        flip = config.flip and run.rng.random() < 0.5
        load = lambda: data.load_image(record, size, crop=config.crop, flip=flip, rng=run.rng)  # noqa: E731
        if run.latent_cache is not None:
            mean, std = run.latent_cache.get(record.path, size, config.crop, flip, load)
            means.append(mean)
            stds.append(std)
        else:
            pixels.append(load())
        captions.append(_shuffled(record.caption, config.trigger, run.rng) if config.shuffle_captions else record.caption)
    captions = objective.drop_captions(captions, config.caption_dropout, run.rng)
    if pixels:  # no cache: the micro-batch (one bucket, so one size) through the VAE in one call
        mean, std = cache.encode_distribution(run.pipe.vae, torch.stack(pixels), device)
    else:
        mean, std = torch.stack(means), torch.stack(stds)
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    noise = torch.randn(mean.shape, generator=run.generator).to(device)
    latents = (mean + std * noise) * run.pipe.vae.config.scaling_factor
    if run.embedding_cache is not None:
        embeddings = run.embedding_cache.get(captions).to(device)
    else:
        embeddings = cache.encode_captions(run.pipe.tokenizer, run.text_encoder, captions, device)
    return latents.to(run.weight_dtype), embeddings.to(run.weight_dtype)


def _shuffled(caption: str, trigger: str | None, rng: random.Random) -> str:
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head = [tags.pop(0)] if trigger and tags and tags[0] == trigger else []
    rng.shuffle(tags)
    return ", ".join(head + tags)


# ---------------------------------------------------------------- checkpoints, validation, outputs


def _start_or_resume(run: Run, metrics: MetricsLogger) -> checkpoint.TrainState:
    state = checkpoint.TrainState(step=0, epoch=0, batch_in_epoch=0)
    if run.config.resume:
        path = checkpoint.find_checkpoint(Path(run.config.output_dir), run.config.resume)
        state = checkpoint.load_checkpoint(path, run.trainable, run.optimizer, run.lr_scheduler)
        checkpoint.restore_rngs(state, run.rng, run.generator)
        metrics.truncate_after(state.step)
    else:
        metrics.truncate_after(-1)  # a fresh run into an old output folder starts a fresh log
    return state


def _save_checkpoint(run: Run, state: checkpoint.TrainState) -> Path | None:
    run.accelerator.wait_for_everyone()
    path = None
    if run.accelerator.is_main_process:
        state.capture_rngs(run.rng, run.generator)
        lora_state = _lora_state(run)
        extra = {DIFFUSERS_FILE: lambda p: report.write_lora_files(lora_state, p, None, run), f"{run.config.name}.safetensors": lambda p: report.write_lora_files(lora_state, None, p, run)}
        path = checkpoint.save_checkpoint(Path(run.config.output_dir) / "checkpoints", state, run.trainable, run.optimizer, run.lr_scheduler, run.config.keep_checkpoints, extra)
        if run.accelerator.is_local_main_process:
            tqdm.write(f"checkpoint {path}: {checkpoint.checkpoint_size(path) / 2**20:.2f} MiB")
    run.accelerator.wait_for_everyone()
    return path


def _lora_state(run: Run):
    unet = run.accelerator.unwrap_model(run.unet)
    text_encoder = run.accelerator.unwrap_model(run.text_encoder) if run.config.train_text_encoder else None
    return lora.extract_lora_state(unet, text_encoder)


def _check_processes_in_sync(run: Run) -> int:
    """Every process must hold bit-identical LoRA weights (DDP all-reduces the gradients); returns the count."""
    flat = torch.cat([p.detach().flatten().to(torch.float32) for p in run.trainable.values()]).unsqueeze(0)
    gathered = run.accelerator.gather(flat.to(run.accelerator.device)).cpu()
    if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
        raise RuntimeError("the training processes ended with different LoRA weights: a distributed-setup bug")
    return int(gathered.shape[0])


def _save_outputs(run: Run, out: Path) -> Path:
    """The diffusers file, the kohya file, config.toml and the model card."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        lora_state = _lora_state(run)
        report.write_lora_files(lora_state, out / DIFFUSERS_FILE, out / f"{run.config.name}.safetensors", run)
        report.write_config_and_card(run, out)
    run.accelerator.wait_for_everyone()
    return out / DIFFUSERS_FILE
