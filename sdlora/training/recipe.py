"""The training recipe, read top to bottom: `setup(config) -> Run`, `run_steps(run)`, `save_outputs(run) -> Path`.

`train(config)` runs the three. `setup` loads the model, the data and the caches, adds LoRA, builds the
optimizer and resumes a checkpoint; `run_steps` is the one training loop; `save_outputs` writes the LoRA files,
config.toml and the model card. Each optimizer step takes `grad_accum` micro-batches (each from one aspect bucket),
turns them into latents and caption embeddings (`cache.BatchEncoder`), computes the noise-prediction loss,
backpropagates into the LoRA parameters only, clips and steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core import targets
from ..core.families import ModelFamily, family_of_pipeline
from ..core.files import read_lora
from ..errors import UserError
from ..inference.samplers import set_sampler
from ..models.loading import load_pipeline, load_vae
from ..storage import output_rules
from ..storage.atomic import remove_leftover_temporaries
from . import checkpoint, ema, network, outputs
from .buckets import BucketBatchSampler, Size
from .cache import BatchEncoder, build_caches, fill_caches
from .config import TrainConfig
from .data import ImageRecord, dataset_summary
from .datasets import DatasetSpec, TrainingData, batch_sizes, load_training_data, record_buckets
from .metrics import MetricsLogger, progress_bar, tracking_options
from .objective import ObjectiveConfig, diffusion_loss, prepare_noise_scheduler
from .optimizers import build_optimizer, check_optimizer, parse_optimizer_args
from .sample_prompts import read_sample_prompts
from .validation import Validator


class TrainingDiverged(UserError):
    """The loss or the gradients stopped being finite."""


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    config: TrainConfig
    accelerator: object
    family: ModelFamily
    pipe: object
    unet: torch.nn.Module  # possibly wrapped by accelerate (DDP)
    text_encoders: dict[str, torch.nn.Module]  # by component; the trained ones possibly wrapped
    noise_scheduler: object
    records: list[ImageRecord]  # the training images, regularization ones last
    buckets: list[Size]  # each record's bucket
    sampler: BucketBatchSampler
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: dict[str, torch.nn.Parameter]  # by `component.parameter name`, as checkpoints store them
    encoder: BatchEncoder
    validator: Validator
    objective: ObjectiveConfig
    generator: torch.Generator  # noise, timesteps and latent samples
    rng: random.Random  # flips, crops, caption dropout and shuffling
    metrics: MetricsLogger
    state: checkpoint.TrainState
    ema: ema.LoraEma | None = None  # --ema-decay: the average of the LoRA weights
    datasets: list[DatasetSpec] = dataclasses.field(default_factory=list)  # a dataset TOML's, for the kohya metadata


def train(config: TrainConfig) -> Path:
    """Train a LoRA as `config` says; returns the path of the diffusers-format file in `config.output_dir`."""
    out = Path(config.output_dir)
    run: Run | None = None
    with _explain_full_disk(out, lambda: run.state.step if run else 0):
        created = not out.exists()
        try:
            run = setup(config)
        except BaseException:
            if created:  # a run that fails before its first step leaves no output folder it made
                shutil.rmtree(out, ignore_errors=True)
            raise
        run_steps(run)
        return save_outputs(run)


# ---------------------------------------------------------------- setup


def setup(config: TrainConfig) -> Run:
    """Load the model and data, add LoRA, build the optimizer, schedule and caches, and resume if asked."""
    from diffusers import DDPMScheduler  # diffusers takes seconds to import: only when training starts
    from diffusers.optimization import get_scheduler

    # the optimizer's package and arguments, checked before anything loads or is created
    optimizer_args = parse_optimizer_args(config.optimizer_args)
    check_optimizer(config.optimizer, config.lr, config.weight_decay, optimizer_args)
    out = Path(config.output_dir)
    # fail before the slow parts (nothing is created until data and model load): a new, empty or sdlora run folder,
    # never one holding or inside an input
    inputs = (config.data_dir, config.reg_data, config.dataset_config, config.model, config.model_config, config.init_lora,
              config.sample_prompts, config.vae)  # fmt: skip
    output_rules.check_run_folder(out, inputs, "--output", resume=bool(config.resume))
    accelerator = _accelerator(config)
    torch.manual_seed(config.seed)
    # the images: DATA_DIR (kohya's N_words subfolders too) and --reg-data, or a kohya dataset TOML
    data: TrainingData = load_training_data(config)
    records, val_records = data.records, data.val_records
    if data.structured and accelerator.is_local_main_process:
        tqdm.write(dataset_summary(records))  # subsets, images, samples per epoch (and the regularization share)
        if data.unused_reg:
            tqdm.write(f"{data.unused_reg} regularization images left out: the training images need fewer (as kohya does)")

    # the model: frozen base weights in half precision under mixed precision; LoRA parameters stay fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipe = load_pipeline(config.model, dtype=weight_dtype, config=config.model_config, allow_pickle=config.allow_pickle)
    if config.vae:
        pipe.vae = load_vae(config.vae, weight_dtype, allow_pickle=config.allow_pickle)
    family = family_of_pipeline(pipe)
    if family.vae_fp32_when_half and weight_dtype != torch.float32 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in half precision unless fixed (its config says so)
    config = _model_defaults(config, pipe, family)
    # the data's buckets and the seeded batch order; with --epochs they give the step count (the schedule needs it)
    buckets = record_buckets(data, config)  # each dataset's own resolution and bucket options
    sampler = BucketBatchSampler(
        buckets, batch_sizes(data, config), seed=config.seed, num_replicas=accelerator.num_processes,
        rank=accelerator.process_index, repeats=[r.repeats for r in records], datasets=[r.dataset for r in records],
    )  # fmt: skip
    if config.epochs:
        config = dataclasses.replace(config, steps=epoch_steps(len(sampler), config.grad_accum, config.epochs))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    text_encoders = {spec.component: getattr(pipe, spec.component) for spec in family.text_encoders}
    for part in (pipe.vae, pipe.unet, *text_encoders.values()):
        part.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = ObjectiveConfig(
        config.prediction_type, config.snr_gamma, config.noise_offset, loss=config.loss, huber_c=config.huber_c,
        huber_schedule=config.huber_schedule, ip_noise_gamma=config.ip_noise_gamma, min_timestep=config.min_timestep,
        max_timestep=config.max_timestep, zero_terminal_snr=config.zero_terminal_snr,
        multires_noise_iterations=config.multires_noise_iterations, multires_noise_discount=config.multires_noise_discount,
    )  # fmt: skip
    prepare_noise_scheduler(noise_scheduler, objective)  # the timestep range must fit it; --zero-terminal-snr rescales it
    if config.sampler:
        set_sampler(pipe, config.sampler)  # how the sample images are drawn; training noises with DDPM above

    # the LoRA: fresh, or a file trained further (a resumed checkpoint later overrides it); fp32 unless --full-bf16/fp16
    lora_dtype = weight_dtype if config.full_bf16 or config.full_fp16 else torch.float32
    unet_params = network.add_lora(
        pipe.unet, targets.unet_target_modules(pipe.unet, config.preset), config.rank, config.alpha, config.dropout,
        conv_rank=config.conv_rank, conv_alpha=config.conv_alpha, dtype=lora_dtype,
    )  # fmt: skip
    param_groups = [{"params": unet_params, "lr": config.lr}]
    trained = {"unet": pipe.unet}
    if config.train_text_encoder:
        for component, encoder in text_encoders.items():
            params = network.add_lora(
                encoder, targets.text_encoder_target_modules(encoder), config.rank, config.alpha, config.dropout, dtype=lora_dtype
            )
            param_groups.append({"params": params, "lr": config.lr_of(component)})
            trained[component] = encoder
    if config.init_lora:
        state = read_lora(config.init_lora, allow_pickle=config.allow_pickle)
        state.check_finite(config.init_lora)
        network.load_state_into(state, trained, label=config.init_lora)
    if accelerator.is_main_process:
        outputs.check_output_dir(out)
        remove_leftover_temporaries(out)  # what a killed run was writing when it died
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for component, model in trained.items():
            if component != "unet":
                model.gradient_checkpointing_enable()
    trainable = {f"{c}.{n}": p for c, model in trained.items() for n, p in model.named_parameters() if p.requires_grad}

    # the optimizer; the schedule is stepped once per optimizer step by the loop, not prepared (accelerate would
    # step it once per process)
    optimizer = build_optimizer(config.optimizer, param_groups, config.lr, config.weight_decay, optimizer_args)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    wrapped, optimizer = dict(zip(trained, prepared[:-1])), prepared[-1]
    if config.full_fp16 and accelerator.scaler is not None:
        _allow_fp16_unscaling(accelerator.scaler)
    unet = wrapped.pop("unet")
    text_encoders.update(wrapped)

    # the caches, filled before the first step
    latent_cache, embedding_cache = build_caches(config, pipe, text_encoders, family, accelerator.device, out, records)
    fill_caches(config, records, buckets, latent_cache, embedding_cache, show=accelerator.is_local_main_process)
    # what the caches now hold, the steps no longer need: the VAE and frozen text encoders leave the accelerator
    # (the encoders stay where some subset's captions change each step and are encoded then)
    every_caption_cached = embedding_cache is not None and all(record.rules.static for record in records)
    offloaded = ([pipe.vae] if latent_cache is not None else []) + ([*text_encoders.values()] if every_caption_cached else [])
    for part in offloaded:
        part.to("cpu")
    encoder = BatchEncoder(
        config=config, pipe=pipe, text_encoders=text_encoders, family=family, records=records, sizes=buckets,
        latent_cache=latent_cache, embedding_cache=embedding_cache, device=accelerator.device, dtype=weight_dtype,
    )  # fmt: skip
    prompt_file = read_sample_prompts(config.sample_prompts) if config.sample_prompts else []
    validator = Validator(
        config=config, accelerator=accelerator, pipe=pipe, unet=unet, text_encoders=text_encoders, family=family,
        noise_scheduler=noise_scheduler, objective=objective, weight_dtype=weight_dtype, records=val_records,
        sample_prompts=list(config.validation_prompts) or ([] if prompt_file else [config.trigger or records[0].caption]),
        prompt_file=prompt_file, offloaded=offloaded,
    )  # fmt: skip
    run = Run(
        config=config, accelerator=accelerator, family=family, pipe=pipe, unet=unet, text_encoders=text_encoders,
        noise_scheduler=noise_scheduler, records=records, buckets=buckets, sampler=sampler, optimizer=optimizer,
        lr_scheduler=lr_scheduler, trainable=trainable, encoder=encoder, validator=validator, objective=objective,
        generator=torch.Generator().manual_seed(config.seed + 1000 * accelerator.process_index),
        rng=random.Random(config.seed + 1000 * accelerator.process_index),
        metrics=MetricsLogger(
            out, accelerator, enabled=accelerator.is_main_process, project=config.tracker_project, config=config.to_dict()
        ),
        state=checkpoint.TrainState(step=0, epoch=0, batch_in_epoch=0),
        ema=ema.LoraEma(trainable, config.ema_decay) if config.ema_decay else None,
        datasets=data.datasets,
    )  # fmt: skip
    _start_or_resume(run)
    return run


def _allow_fp16_unscaling(scaler) -> None:
    """torch's GradScaler refuses to unscale fp16 gradients ("Attempting to unscale FP16 gradients"); with fp16 LoRA
    weights (--full-fp16) they are all fp16, so the check is lifted, as kohya's patch_accelerator_for_fp16_training
    does. Inf/NaN detection and the scale's growth and backoff work as before."""
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(optimizer, inv_scale, found_inf, True)


def epoch_steps(batches_per_epoch: int, grad_accum: int, epochs: int) -> int:
    """Optimizer steps in `epochs` epochs of `batches_per_epoch` batches per process, as kohya's train_network counts
    them: epochs * ceil(batches / grad_accum)."""
    return epochs * math.ceil(batches_per_epoch / grad_accum)


def _model_defaults(config: TrainConfig, pipe, family: ModelFamily) -> TrainConfig:
    """The options left to the model filled in: its own resolution (as its pipeline generates by default) and
    its family's bucketing (on for SDXL)."""
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    buckets = family.buckets_by_default if config.buckets is None else config.buckets
    return dataclasses.replace(config, resolution=resolution, buckets=buckets)


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator  # accelerate imports torch.distributed and more: only when training starts
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings per process: a second train() (a notebook) with another precision would be
    # refused. Only the accelerator-level state is cleared; the process group (PartialState) stays.
    AcceleratorState._reset_state()
    # several processes without CUDA (torchrun/accelerate launch on CPUs) need accelerate's CPU mode for gloo
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # the --report-to trackers (a chosen one not installed is a ValueError here, before anything loads); the
    # MetricsLogger starts them on the main process
    trackers = tracking_options(config.report_to, config.output_dir)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=multi_cpu, **trackers)


def _start_or_resume(run: Run) -> None:
    if run.config.resume:
        path = checkpoint.find_checkpoint(Path(run.config.output_dir), run.config.resume)
        run.state = checkpoint.load_checkpoint(path, run.trainable, run.optimizer, run.lr_scheduler)
        if run.ema is not None:
            run.ema.load(path / ema.STATE_FILE)
        checkpoint.restore_rngs(run.state, run.rng, run.generator)
        run.metrics.truncate_after(run.state.step)
    else:
        run.metrics.truncate_after(-1)  # a fresh run into an old output folder starts a fresh log


# ---------------------------------------------------------------- the loop


def run_steps(run: Run) -> None:
    """Train from `run.state.step` to `config.steps`, with checkpoints, validation and metrics along the way."""
    config, accelerator, state, metrics = run.config, run.accelerator, run.state, run.metrics
    if state.step == 0 and config.sample_at_first:
        run.validator.evaluate(metrics, 0)  # the base model's samples (and loss), to compare the LoRA against
    elif state.step == 0 and run.validator.records:
        metrics.log(0, val_loss=run.validator.loss())  # the base model's loss, to compare the LoRA against
    bar = progress_bar(config.steps, state.step, disable=not accelerator.is_local_main_process)
    batches = _batches(run)
    with contextlib.closing(bar):  # closed on errors too, so an error message starts on a line of its own
        while state.step < config.steps:
            loss, grad_norm = _optimizer_step(run, batches)
            state.step += 1
            lr = run.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            metrics.log(state.step, loss=loss, lr=lr, grad_norm=grad_norm, epoch=state.epoch)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < config.steps:
                _save_checkpoint(run)
            if config.validate_every and state.step % config.validate_every == 0 and state.step < config.steps:
                run.validator.evaluate(metrics, state.step)
    _save_checkpoint(run)
    run.validator.evaluate(metrics, state.step)
    if accelerator.num_processes > 1:
        metrics.log(state.step, processes_in_sync=_check_processes_in_sync(run))


def _batches(run: Run) -> Iterator[list[int]]:
    """Batches of dataset indices in a seeded order, from the resume position on; advances the state's epoch/position."""
    state = run.state
    while True:
        run.sampler.set_epoch(state.epoch)
        epoch_batches = list(run.sampler)
        while state.batch_in_epoch < len(epoch_batches):
            batch = epoch_batches[state.batch_in_epoch]
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def _optimizer_step(run: Run, batches: Iterator[list[int]]) -> tuple[float, float]:
    """grad_accum micro-batches, clip, step; raises TrainingDiverged on a non-finite loss or gradient."""
    config, accelerator, step = run.config, run.accelerator, run.state.step + 1
    # randomness is a function of (seed, step, process): a resumed run and every rank draw exactly what they would have
    step_seed = (config.seed * 1_000_003 + step * 1_009 + accelerator.process_index) % 2**63
    run.generator.manual_seed(step_seed)
    run.rng.seed(step_seed)
    torch.manual_seed(step_seed)  # LoRA dropout draws from the global generator
    total = 0.0
    for micro in range(config.grad_accum):
        indices = next(batches)
        latents, embeddings = run.encoder(indices, run.rng, run.generator)
        weights = _loss_weights(run, indices)
        sync = contextlib.nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(run.unet)
        with sync, accelerator.autocast():
            loss = diffusion_loss(
                run.unet, run.noise_scheduler, latents, embeddings, run.objective, generator=run.generator, weights=weights
            )
        if not torch.isfinite(loss):
            raise TrainingDiverged(_diverged_message(step, f"the loss became {loss.item()}", run))
        accelerator.backward(loss / config.grad_accum)
        total += loss.item() / config.grad_accum
    grad_norm = float(
        accelerator.clip_grad_norm_(list(run.trainable.values()), config.max_grad_norm or math.inf)
    )  # inf: measure, do not clip
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(_diverged_message(step, f"the gradient norm became {grad_norm}", run))
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.trainable, step)
    return total, grad_norm


def _loss_weights(run: Run, indices: list[int]) -> torch.Tensor | None:
    """Each image's loss weight, as kohya weights them: --prior-loss-weight for regularization images, 1 for the
    others (None when there are none: the plain mean)."""
    if not any(run.records[index].is_reg for index in indices):
        return None
    weight = run.config.prior_loss_weight
    return torch.tensor([weight if run.records[index].is_reg else 1.0 for index in indices], device=run.accelerator.device)


def _diverged_message(step: int, what: str, run: Run) -> str:
    found = checkpoint.latest_checkpoint(Path(run.config.output_dir) / "checkpoints")
    kept = f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"
    hint = "use --mixed-precision bf16 instead of fp16, " if run.config.mixed_precision == "fp16" else ""
    return f"training stopped at step {step}: {what}; {kept}. Try {hint}a lower --lr (now {run.config.lr:g}) or --max-grad-norm 1"


@contextlib.contextmanager
def _explain_full_disk(out: Path, step):
    """A full disk anywhere in a run (cache, checkpoint, samples, outputs) becomes one line that says what to do."""
    try:
        yield
    except OSError as err:
        if err.errno not in checkpoint.DISK_FULL or isinstance(err, checkpoint.DiskFullError):
            raise
        last = checkpoint.latest_checkpoint(out / "checkpoints")
        then = (
            f"the last complete checkpoint is {last}: free space, then rerun with --resume latest"
            if last
            else "no checkpoint was written yet: free space, then run again"
        )
        where = f" writing {err.filename}" if err.filename else ""
        raise checkpoint.DiskFullError(err.errno, f"no space left on device{where} at step {step()}; {then}") from err


# ---------------------------------------------------------------- checkpoints and outputs


def lora_state(run: Run):
    """The LoRA as trained so far, as a LoraState (fp32 CPU copies)."""
    trained = {"unet": run.unet} | (run.text_encoders if run.config.train_text_encoder else {})
    return network.extract_lora_state({c: run.accelerator.unwrap_model(model) for c, model in trained.items()})


def _save_checkpoint(run: Run) -> Path | None:
    run.accelerator.wait_for_everyone()
    path = None
    if run.accelerator.is_main_process:
        run.state.capture_rngs(run.rng, run.generator)
        files = outputs.lora_writers(lora_state(run), run.config, run.family, run.records, datasets=run.datasets)
        if run.ema is not None:
            files[ema.STATE_FILE] = run.ema.save
        path = checkpoint.save_checkpoint(
            Path(run.config.output_dir) / "checkpoints",
            run.state,
            run.trainable,
            run.optimizer,
            run.lr_scheduler,
            run.config.keep_checkpoints,
            files,
        )
        if run.accelerator.is_local_main_process:
            tqdm.write(f"checkpoint {path}: {checkpoint.checkpoint_size(path) / 2**20:.2f} MiB")
    run.accelerator.wait_for_everyone()
    return path


def _check_processes_in_sync(run: Run) -> int:
    """Every process must hold bit-identical LoRA weights (DDP all-reduces the gradients); returns the count."""
    flat = torch.cat([p.detach().flatten().to(torch.float32) for p in run.trainable.values()]).unsqueeze(0)
    gathered = run.accelerator.gather(flat.to(run.accelerator.device)).cpu()
    if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
        raise RuntimeError("the training processes ended with different LoRA weights: a distributed-setup bug")
    return int(gathered.shape[0])


def save_outputs(run: Run) -> Path:
    """The diffusers file, the kohya file, config.toml and the model card; returns the diffusers file's path."""
    out = Path(run.config.output_dir)
    run.metrics.close()
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        for name, write in outputs.lora_writers(lora_state(run), run.config, run.family, run.records, datasets=run.datasets).items():
            write(out / name)
        if run.ema is not None:
            with run.ema.applied(run.trainable):
                averaged = lora_state(run)
            writers = outputs.lora_writers(averaged, run.config, run.family, run.records, suffix=outputs.EMA_SUFFIX, datasets=run.datasets)
            for name, write in writers.items():
                write(out / name)
        outputs.write_config_and_card(run.config, run.family, len(run.records), out)
    run.accelerator.wait_for_everyone()
    return out / outputs.DIFFUSERS_FILE
