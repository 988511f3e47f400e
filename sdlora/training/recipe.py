"""The training recipe, read top to bottom: `setup(config) -> Run`, `run_steps(run)`, `save_outputs(run) -> Path`.

`train(config)` runs the three. `setup` loads the model, the data and the caches, adds LoRA, builds the
optimizer and resumes a checkpoint; `run_steps` is the one training loop; `save_outputs` writes the LoRA files,
config.toml and the model card. Each optimizer step takes `grad_accum` micro-batches (each from one aspect bucket),
turns them into latents and caption embeddings (`cache.BatchEncoder`), computes the noise-prediction loss,
backpropagates into the LoRA parameters only, clips and steps.
"""

from __future__ import annotations

import collections
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
from ..core.families import ModelFamily
from ..core.files import read_lora
from ..errors import UserError
from ..inference.samplers import set_sampler
from ..storage import output_rules
from ..storage.atomic import remove_leftover_temporaries
from . import blocks, checkpoint, ema, memory, network, outputs
from .base_model import BaseModel, load_base_model
from .buckets import BucketBatchSampler, Size
from .cache import BatchEncoder, ImageLoader, build_caches, encoder_dropout_rates, fill_caches
from .config import BaseModelConfig, DataConfig, LoggingConfig, NetworkConfig, ObjectiveConfig, OptimizationConfig, TrainConfig
from .data import ImageRecord, dataset_summary
from .datasets import DatasetSpec, TrainingData, batch_sizes, load_training_data, record_buckets
from .metrics import MetricsLogger, progress_bar, tracking_options
from .objective import diffusion_loss, prepare_flow_scheduler, prepare_noise_scheduler
from .optimizers import Fp32MasterWeights, build_optimizer, check_optimizer, device_optimizer_args, parse_optimizer_args
from .sample_prompts import read_sample_prompts
from .validation import Validator

# The memory plan is printed on accelerators and with --dry-run. Its trace runs the model's operators through PyTorch's
# Python meta kernels (a few seconds, even for the tiny model): on a CPU, where every part of the pipeline shares the
# one memory and a run is limited by RAM, it is left out unless asked for (bench/bench_memory_plan.py asks).
PLAN_ON_CPU = False


class TrainingDiverged(UserError):
    """The loss or the gradients stopped being finite."""


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    config: TrainConfig
    accelerator: object
    model: BaseModel  # the pipeline, the (possibly DDP-wrapped) UNet and text encoders, the DDPM noise scheduler
    records: list[ImageRecord]  # the training images, regularization ones last
    buckets: list[Size]  # each record's bucket
    sampler: BucketBatchSampler
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: dict[str, torch.nn.Parameter]  # by `component.parameter name`, as checkpoints store them
    encoder: BatchEncoder
    validator: Validator
    generator: torch.Generator  # noise, timesteps and latent samples
    rng: random.Random  # flips, crops, caption dropout and shuffling
    metrics: MetricsLogger
    state: checkpoint.TrainState
    ema: ema.LoraEma | None = None  # --ema-decay: the average of the LoRA weights
    datasets: list[DatasetSpec] = dataclasses.field(default_factory=list)  # a dataset TOML's, for the kohya metadata
    plan: memory.MemoryPlan | None = None  # the accelerator memory each phase was estimated to need


def train(config: TrainConfig) -> Path | None:
    """Train a LoRA as `config` says; returns the path of the diffusers-format file in `config.run.output_dir`, the
    kohya file for a --kind diffusers cannot load (None after --dry-run's memory plan)."""
    out = Path(config.run.output_dir)
    run: Run | None = None
    with _explain_full_disk(out, lambda: run.state.step if run else 0):
        created = not out.exists()
        try:
            run = setup(config)
        except BaseException:
            if created:  # a run that fails before its first step leaves no output folder it made
                shutil.rmtree(out, ignore_errors=True)
            raise
        if run is None:  # --dry-run: the plan was the point
            if created:
                shutil.rmtree(out, ignore_errors=True)
            return None
        try:
            run_steps(run)
        finally:
            if run.encoder.loader is not None:
                run.encoder.loader.close()
        return save_outputs(run)


# ---------------------------------------------------------------- setup


def setup(config: TrainConfig) -> Run | None:
    """Check the inputs, load the data and the model, add LoRA, print the memory plan, build the caches, the
    optimizer and the validation, and resume if asked. Each step is handed the sections it works from. With
    --dry-run, returns None after the plan."""
    config = config.replace(mixed_precision=resolve_mixed_precision(config.base))  # --mixed-precision auto: this machine's
    accelerator = _setup_accelerator(config)
    data = _setup_data(config, accelerator)
    model = load_base_model(config.base, accelerator.device)
    config = _model_defaults(config, model)  # the resolution and bucketing the model implies
    buckets = record_buckets(data, config.data)  # each dataset's own resolution and bucket options
    sampler = _setup_sampler(config, data, buckets, accelerator)
    if config.optimization.epochs:  # the step count the schedule needs
        config = config.replace(steps=epoch_steps(len(sampler), config.optimization.grad_accum, config.optimization.epochs))
    _setup_objective(config.objective, model)
    param_groups = _setup_network(config.network, config.optimization, config.base, model)
    plan = _setup_memory_plan(config, model, data, buckets, accelerator)
    if config.run.dry_run:
        return None
    if config.base.compile:  # in place (Module.compile): parameter names and state dicts stay the UNet's own
        model.unet.compile()
    _setup_output_dir(Path(config.run.output_dir), accelerator)
    trainable = {f"{c}.{n}": p for c in model.trained for n, p in _component(model, c).named_parameters() if p.requires_grad}
    # the caches first: the VAE and text encoders fill them before the UNet reaches the accelerator
    encoder = _setup_caches(config.data, model, data.records, buckets, Path(config.run.output_dir), accelerator)
    optimizer, lr_scheduler = _setup_optimizer(config.optimization, param_groups, model, accelerator, config.base.full_fp16)
    validator = _setup_validation(config, model, accelerator, data)
    process = accelerator.process_index
    run = Run(
        config=config, accelerator=accelerator, model=model, records=data.records, buckets=buckets, sampler=sampler,
        optimizer=optimizer, lr_scheduler=lr_scheduler, trainable=trainable, encoder=encoder, validator=validator,
        generator=torch.Generator().manual_seed(config.run.seed + 1000 * process), rng=random.Random(config.run.seed + 1000 * process),
        metrics=_setup_metrics(config, accelerator),
        state=checkpoint.TrainState(step=0, epoch=0, batch_in_epoch=0),
        ema=ema.LoraEma(trainable, config.optimization.ema_decay) if config.optimization.ema_decay else None,
        datasets=data.datasets, plan=plan,
    )  # fmt: skip
    _start_or_resume(run)
    return run


def _setup_objective(objective: ObjectiveConfig, model: BaseModel) -> None:
    """The training scheduler set up for the objective's options, each refused where the model's kind has no use for it."""
    if model.flow_matching:  # SD3: the options the flow-matching objective takes
        prepare_flow_scheduler(model.noise_scheduler, objective)
    else:
        prepare_noise_scheduler(model.noise_scheduler, objective)  # the timestep range must fit; --zero-terminal-snr


def _setup_accelerator(config: TrainConfig):
    """Everything that can be refused before anything loads (the optimizer and its arguments, the files the options
    name, the output folder), then the accelerator and the global seed; says when --kind gets no diffusers file."""
    optimization = config.optimization
    check_optimizer(optimization.optimizer, optimization.lr, optimization.weight_decay, parse_optimizer_args(optimization.optimizer_args))
    if config.network.init_lora is not None and not Path(config.network.init_lora).is_file():
        raise UserError(f"--init-lora {config.network.init_lora}: no such file")
    if config.samples.sample_prompts is not None:
        read_sample_prompts(config.samples.sample_prompts)  # a bad line fails here, before anything loads
    # a new, empty or sdlora run folder, never one holding or inside an input (nothing is created until data and
    # model load)
    data, base = config.data, config.base
    inputs = (data.data_dir, data.reg_data, data.dataset_config, data.mask_dir, base.model, base.model_config, config.network.init_lora,
              config.samples.sample_prompts, base.vae)  # fmt: skip
    output_rules.check_run_folder(Path(config.run.output_dir), inputs, "--output", resume=bool(config.run.resume))
    accelerator = _accelerator(config.base, config.logging, config.run.output_dir)
    if accelerator.device.type == "cuda":  # TF32 products for the fp32 parts (Ampere and newer; ignored before)
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if config.base.tf32 else "ieee"
    torch.manual_seed(config.run.seed)
    if accelerator.is_local_main_process:  # once, before anything loads: a file some loader cannot take as it is
        for note in outputs.loader_notes(config):
            tqdm.write(note)
    return accelerator


def _setup_data(config: TrainConfig, accelerator) -> TrainingData:
    """The images: DATA_DIR (kohya's N_words subfolders too) and --reg-data, or a kohya dataset TOML; what they add up
    to, said when there is more than one folder."""
    data = load_training_data(config.data, config.run.seed, config.run.output_dir)
    _check_masks(config, data)
    if data.structured and accelerator.is_local_main_process:
        tqdm.write(dataset_summary(data.records))  # subsets, images, samples per epoch (and the regularization share)
        if data.unused_reg:
            tqdm.write(f"{data.unused_reg} regularization images left out: the training images need fewer (as kohya does)")
    return data


def _check_masks(config: TrainConfig, data: TrainingData) -> None:
    """A dataset TOML's masks and --masked-loss go together (the flags' own are checked with the config)."""
    masked = [record for record in data.records + data.val_records if record.mask_source is not None]
    where = f"--dataset-config {config.data.dataset_config}"
    if config.objective.masked_loss and not masked:
        raise UserError(f"--masked-loss needs masks: {where} gives none; set conditioning_data_dir or alpha_mask = true in its subsets")
    if masked and not config.objective.masked_loss:
        raise UserError(
            f"{where} gives loss masks ({masked[0].mask_source.name}...), which only --masked-loss uses: add --masked-loss (masked_loss = true)"
        )


def _setup_output_dir(out: Path, accelerator) -> None:
    if accelerator.is_main_process:
        outputs.check_output_dir(out)
        remove_leftover_temporaries(out)  # what a killed run was writing when it died


def _setup_metrics(config: TrainConfig, accelerator) -> MetricsLogger:
    """metrics.jsonl (and the trackers) with the run's options, written by the main process."""
    return MetricsLogger(
        Path(config.run.output_dir),
        accelerator,
        enabled=accelerator.is_main_process,
        project=config.logging.tracker_project,
        config=config.to_dict(),
    )


def _setup_sampler(config: TrainConfig, data: TrainingData, buckets: list[Size], accelerator) -> BucketBatchSampler:
    """Batches of one bucket each, in a seeded order, each process its share."""
    return BucketBatchSampler(
        buckets, batch_sizes(data, config.data), seed=config.run.seed, num_replicas=accelerator.num_processes,
        rank=accelerator.process_index, repeats=[r.repeats for r in data.records], datasets=[r.dataset for r in data.records],
    )  # fmt: skip


def _setup_memory_plan(
    config: TrainConfig, model: BaseModel, data: TrainingData, buckets: list[Size], accelerator
) -> memory.MemoryPlan | None:
    """The memory plan of this run (on an accelerator, or asked for with --dry-run), printed once."""
    if not (config.run.dry_run or accelerator.device.type != "cpu" or PLAN_ON_CPU):
        return None
    records = data.records
    plan = memory.plan_memory(
        config, model, max(buckets, key=lambda size: size[0] * size[1]), max(batch_sizes(data, config.data)), accelerator.device,
        latents_cached=config.data.cache != "off" and all(record.rules.crop != "random" for record in records),
        captions_cached=config.data.cache != "off" and not config.network.train_text_encoder and all(r.rules.static for r in records),
    )  # fmt: skip
    if accelerator.is_main_process:
        tqdm.write(plan.table())
    return plan


def _setup_network(options: NetworkConfig, optimization: OptimizationConfig, base: BaseModelConfig, model: BaseModel) -> list[dict]:
    """LoRA on the UNet (and the text encoders with --train-text-encoder): fresh, or a file trained further (a
    resumed checkpoint later overrides it); fp32 unless --full-bf16/--full-fp16. Returns the optimizer's parameter
    groups, each at its component's learning rate; `model.trained` names the components."""
    if model.family.kohya_unet_names == "mmdit" and options.kind != "lora":  # before the LoRA is added, let alone trained
        raise UserError(
            f"--kind {options.kind} on {model.family.label}: kohya's file (and ComfyUI's and Forge's reading of it) fuses "
            "q, k and v into one qkv layer, which only a plain LoRA fits exactly in its own form; train it with --kind lora"
        )
    lora_dtype = model.dtype if base.full_bf16 or base.full_fp16 else torch.float32
    unet_targets = targets.unet_target_modules(model.unet, options.preset, options.lora_blocks)
    plan = blocks.block_plan(model.unet, unet_targets, options, model.family)  # kohya's block_dims / *_lr_weight
    lycoris = None  # LyCORIS's LoHa/LoKr arguments (its dropouts among them); LoRA and DoRA take kohya's dropouts below
    if options.kind in network.TUCKER_KINDS:
        lycoris = network.LycorisOptions(
            options.lokr_factor, options.lokr_decompose_both, options.use_tucker, options.rank_dropout, options.module_dropout,
            options.rank_dropout_scale,
        )  # fmt: skip
    network.add_lora(
        model.unet, list(plan.ranks) if plan else unet_targets, options.rank, options.alpha, options.dropout,
        conv_rank=options.conv_rank, conv_alpha=options.conv_alpha, dtype=lora_dtype, kind=options.kind,
        module_ranks=plan.ranks if plan else None, lycoris=lycoris, dora_axis=options.dora_axis,
    )  # fmt: skip
    param_groups = network.parameter_groups(
        model.unet,
        optimization.lr,
        optimization.loraplus_ratio(model.family.denoiser),
        plan.lr_weight if plan and plan.lr_weights else None,
    )
    trained = {model.family.denoiser: model.unet}
    if options.train_text_encoder:
        for component, encoder in model.text_encoders.items():
            if model.family.text_encoder(component).architecture == "t5":  # SD3's T5 (4.7B parameters) stays frozen, as in kohya
                continue
            network.add_lora(
                encoder, targets.text_encoder_target_modules(encoder, spec=model.family.text_encoder(component)), options.rank, options.alpha,
                options.dropout, dtype=lora_dtype, kind=options.kind, lycoris=lycoris, dora_axis=options.dora_axis,
            )  # fmt: skip
            param_groups += network.parameter_groups(encoder, optimization.lr_of(component), optimization.loraplus_ratio(component))
            trained[component] = encoder
    if lycoris is None:
        for part in trained.values():
            network.add_kohya_dropout(part, options.network_dropout, options.rank_dropout, options.module_dropout)
    model.trained = tuple(trained)
    if options.init_lora:
        state = read_lora(options.init_lora, allow_pickle=base.allow_pickle)
        state.check_finite(options.init_lora)
        network.load_state_into(state, trained, label=options.init_lora, family=model.family)
    if base.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for component in model.trained[1:]:
            trained[component].gradient_checkpointing_enable()
    return param_groups


def _component(model: BaseModel, component: str) -> torch.nn.Module:
    return model.unet if component == model.family.denoiser else model.text_encoders[component]


def _setup_optimizer(optimization: OptimizationConfig, param_groups: list[dict], model: BaseModel, accelerator, full_fp16: bool):
    """The optimizer and its learning-rate schedule; the trained parts and the optimizer prepared by accelerate (the
    model's UNet and trained text encoders become their DDP wrappers). The schedule is stepped once per optimizer
    step by the loop, not prepared (accelerate would step it once per process)."""
    from diffusers.optimization import get_scheduler  # diffusers takes seconds to import: only when training starts

    for component in model.trained:  # the UNet arrives only now, after the caches; the optimizer's state is made there
        _component(model, component).to(accelerator.device)
    arguments = device_optimizer_args(optimization.optimizer, parse_optimizer_args(optimization.optimizer_args), accelerator.device)

    def build(groups: list[dict]) -> torch.optim.Optimizer:
        return build_optimizer(optimization.optimizer, groups, optimization.lr, optimization.weight_decay, arguments)

    # fp16 LoRA weights step through fp32 copies: an fp16 optimizer state turns AdamW's first update into 0/0
    optimizer = Fp32MasterWeights(param_groups, build) if full_fp16 else build(param_groups)
    lr_scheduler = get_scheduler(
        optimization.lr_scheduler, optimizer, num_warmup_steps=optimization.lr_warmup_steps, num_training_steps=optimization.steps
    )
    prepared = accelerator.prepare(*(_component(model, c) for c in model.trained), optimizer)
    wrapped, optimizer = dict(zip(model.trained, prepared[:-1])), prepared[-1]
    if full_fp16 and accelerator.scaler is not None:
        _allow_fp16_unscaling(accelerator.scaler)
    model.unet = wrapped.pop(model.family.denoiser)
    model.text_encoders.update(wrapped)
    return optimizer, lr_scheduler


def _setup_caches(data: DataConfig, model: BaseModel, records, buckets, out: Path, accelerator) -> BatchEncoder:
    """The latent and caption caches, filled before the first step (a disk cache once for all processes, each
    encoding its share), and the encoder of batches that reads them. What the caches now hold the steps no longer need: the VAE and frozen text encoders leave the accelerator (the
    encoders stay where some subset's captions change each step and are encoded then)."""
    dropout = encoder_dropout_rates(data, model)  # SD3's per-encoder rates, refused for other families before any encoding
    latent_cache, embedding_cache = build_caches(data.cache, model, out, records)
    fill_caches(
        records, buckets, latent_cache, embedding_cache, show=accelerator.is_local_main_process, batch_size=data.vae_batch_size,
        share=(accelerator.process_index, accelerator.num_processes), wait_for_everyone=accelerator.wait_for_everyone,
    )  # fmt: skip
    every_caption_cached = embedding_cache is not None and all(record.rules.static for record in records)
    pipe = model.pipe
    model.offloaded = ([pipe.vae] if latent_cache is not None else []) + ([*model.text_encoders.values()] if every_caption_cached else [])
    for part in model.offloaded:
        part.to("cpu")
    loader = ImageLoader(records, data.workers) if latent_cache is None and data.workers else None  # uncached: load ahead
    return BatchEncoder(data, model, records, buckets, latent_cache, embedding_cache, loader, dropout)


def _setup_validation(config: TrainConfig, model: BaseModel, accelerator, data: TrainingData) -> Validator:
    """The held-out loss and the sample images: --validation-prompts, else the --sample-prompts file's lines, else the
    trigger word or the first caption, drawn with the run's sampler."""
    samples = config.samples
    if samples.sampler:
        set_sampler(model.pipe, samples.sampler)  # how the sample images are drawn; training noises with DDPM
    prompt_file = read_sample_prompts(samples.sample_prompts) if samples.sample_prompts else []
    prompts = list(samples.validation_prompts) or ([] if prompt_file else [config.data.trigger or data.records[0].caption])
    return Validator(samples, config.data, config.run, model, accelerator, config.objective, data.val_records, prompts, prompt_file)


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


# the training side from which gradient checkpointing is on unless told otherwise, by family: SDXL's UNet at 1024 px
# keeps over 12 GB of activations for the backward pass at batch 1 in bf16 (diffusers and kohya advise checkpointing)
CHECKPOINTING_FROM_RESOLUTION = {"sdxl": 1024}


def resolve_mixed_precision(base: BaseModelConfig) -> str:
    """--mixed-precision auto made concrete: what --full-bf16/--full-fp16 need, else bf16 on a CUDA GPU that has it,
    fp16 (with accelerate's loss scaler) on one that does not, and no on anything else (a CPU runs bf16 slower
    than fp32). Given values are kept."""
    if base.mixed_precision != "auto":
        return base.mixed_precision
    if base.full_bf16 or base.full_fp16:
        return "bf16" if base.full_bf16 else "fp16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _model_defaults(config: TrainConfig, model: BaseModel) -> TrainConfig:
    """The options left to the model filled in: its own resolution (as its pipeline generates by default), its
    family's bucketing (on for SDXL) and gradient checkpointing (on for SDXL from 1024 px)."""
    data, pipe = config.data, model.pipe
    resolution = data.resolution or model.unet.config.sample_size * pipe.vae_scale_factor
    defaults = family_defaults(model.family, resolution)
    buckets = defaults["buckets"] if data.buckets is None else data.buckets
    checkpointing = config.base.gradient_checkpointing
    if checkpointing is None:
        checkpointing = defaults["gradient_checkpointing"]
    return config.replace(resolution=resolution, buckets=buckets, gradient_checkpointing=checkpointing)


def family_defaults(family: ModelFamily, resolution: int) -> dict[str, bool]:
    """What training takes, when not told, for a model of `family` trained at `resolution` (the UI's form shows it)."""
    return {
        "buckets": family.buckets_by_default,
        "gradient_checkpointing": resolution >= CHECKPOINTING_FROM_RESOLUTION.get(family.name, math.inf),
    }


def _accelerator(base: BaseModelConfig, logging: LoggingConfig, output_dir: str):
    from accelerate import Accelerator  # accelerate imports torch.distributed and more: only when training starts
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings per process: a second train() (a notebook) with another precision would be
    # refused. Only the accelerator-level state is cleared; the process group (PartialState) stays.
    AcceleratorState._reset_state()
    _refuse_sharded_training(None)  # an `accelerate launch` DeepSpeed/FSDP config says so in the environment
    # several processes without CUDA (torchrun/accelerate launch on CPUs) need accelerate's CPU mode for gloo
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # the --report-to trackers (a chosen one not installed is a UserError here, before anything loads); the
    # MetricsLogger starts them on the main process
    trackers = tracking_options(logging.report_to, output_dir)
    accelerator = Accelerator(mixed_precision=base.mixed_precision, cpu=multi_cpu, **trackers)
    _refuse_sharded_training(accelerator.distributed_type)  # one set up some other way
    return accelerator


# the setups that shard the model or the optimizer: accelerate's distributed type -> (its launch variable, name)
_SHARDED = {
    "DEEPSPEED": ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
    "FSDP": ("ACCELERATE_USE_FSDP", "FSDP"),
    "MEGATRON_LM": ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"),
}


def _refuse_sharded_training(distributed_type) -> None:
    """DeepSpeed, FSDP and Megatron-LM (set by an `accelerate launch` config's variables, or `distributed_type`)
    are refused with one line: the LoRA weights are a few MB, so sharding them saves nothing, and checkpoints, the
    processes' sync check and the saved files read every weight whole on each process. DDP trains on several GPUs."""
    from accelerate.utils import parse_flag_from_env  # accelerate imports torch.distributed and more: only when training starts

    kind = getattr(distributed_type, "value", distributed_type)
    for sharded, (variable, name) in _SHARDED.items():
        if kind == sharded or parse_flag_from_env(variable):
            raise UserError(
                f"{name} is not supported: sdlora trains on several GPUs with DDP only; launch with `accelerate launch"
                " --multi_gpu --num_processes N` or torchrun, or answer no to DeepSpeed/FSDP in `accelerate config` (docs/guides/multi-gpu.md)"
            )


def _start_or_resume(run: Run) -> None:
    if run.config.run.resume:
        path = checkpoint.find_checkpoint(Path(run.config.run.output_dir), run.config.run.resume)
        run.state = checkpoint.load_checkpoint(path, run.trainable, run.optimizer, run.lr_scheduler, run.accelerator.scaler)
        if run.ema is not None:
            run.ema.load(path / ema.STATE_FILE)
        checkpoint.restore_rngs(run.state, run.rng, run.generator)
        run.metrics.truncate_after(run.state.step)
    else:
        run.metrics.truncate_after(-1)  # a fresh run into an old output folder starts a fresh log


# ---------------------------------------------------------------- the loop


def run_steps(run: Run) -> None:
    """Train from `run.state.step` to `config.optimization.steps`, with checkpoints, validation and metrics along the way."""
    config, accelerator, state, metrics = run.config, run.accelerator, run.state, run.metrics
    _adapters_training(run, False)  # LoRA dropouts only in the steps, never in the held-out loss or the samples
    if state.step == 0 and config.samples.sample_at_first:
        run.validator.evaluate(metrics, 0)  # the base model's samples (and loss), to compare the LoRA against
    elif state.step == 0 and run.validator.records:
        metrics.log(0, val_loss=run.validator.loss())  # the base model's loss, to compare the LoRA against
    bar = progress_bar(config.optimization.steps, state.step, disable=not accelerator.is_local_main_process)
    batches = _Batches(run)
    _adapters_training(run, True)
    with contextlib.closing(bar):  # closed on errors too, so an error message starts on a line of its own
        while state.step < config.optimization.steps:
            loss, grad_norm, skipped, norms = _optimizer_step(run, batches)
            state.step += 1
            state.skipped_steps += skipped
            # the UNet's base rate: group 0 may be a block's (block learning-rate weights) at a multiple of it
            lr = run.lr_scheduler.get_last_lr()[0] * config.optimization.lr / run.lr_scheduler.base_lrs[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **({"skipped": state.skipped_steps} if state.skipped_steps else {}))
            scaled = {"skipped_steps": state.skipped_steps} if accelerator.scaler is not None else {}  # fp16's overflows
            metrics.log(state.step, loss=loss, lr=lr, grad_norm=grad_norm, epoch=state.epoch, **scaled, **norms)
            if config.run.checkpoint_every and state.step % config.run.checkpoint_every == 0 and state.step < config.optimization.steps:
                _save_checkpoint(run)
            if config.samples.validate_every and state.step % config.samples.validate_every == 0 and state.step < config.optimization.steps:
                _adapters_training(run, False)
                run.validator.evaluate(metrics, state.step)
                _adapters_training(run, True)  # the samples left the whole UNet in evaluation mode
    _adapters_training(run, False)
    _save_checkpoint(run)
    run.validator.evaluate(metrics, state.step)
    if accelerator.num_processes > 1:
        metrics.log(state.step, processes_in_sync=_check_processes_in_sync(run))


def _adapters_training(run: Run, training: bool) -> None:
    """The trained parts' adapter layers in training mode (their dropouts on) for the steps, in evaluation mode otherwise."""
    for component in run.model.trained:
        network.set_adapter_training(_component(run.model, component), training)


class _Batches:
    """The micro-batches of dataset indices in a seeded order, from the resume position on. Taking one moves the
    state's epoch/position past it; `ahead(n)` shows the next n without taking them (to load their images early)."""

    def __init__(self, run: Run):
        self.run, self.queue = run, collections.deque()
        self.source = self._positions(run.state.epoch, run.state.batch_in_epoch)

    def _positions(self, epoch: int, position: int) -> Iterator[tuple[list[int], int, int]]:
        while True:
            self.run.sampler.set_epoch(epoch)
            epoch_batches = list(self.run.sampler)
            while position < len(epoch_batches):
                position += 1
                yield epoch_batches[position - 1], epoch, position
            epoch, position = epoch + 1, 0

    def ahead(self, n: int) -> list[list[int]]:
        while len(self.queue) < n:
            self.queue.append(next(self.source))
        return [batch for batch, _, _ in list(self.queue)[:n]]

    def __next__(self) -> list[int]:
        self.ahead(1)
        batch, self.run.state.epoch, self.run.state.batch_in_epoch = self.queue.popleft()
        return batch


def _step_seed(config: TrainConfig, step: int, process: int) -> int:
    """The seed of a step's randomness on one process: a resumed run and every rank draw exactly what they would have."""
    return (config.run.seed * 1_000_003 + step * 1_009 + process) % 2**63


def _optimizer_step(run: Run, batches: _Batches) -> tuple[float, float, bool, dict[str, float]]:
    """grad_accum micro-batches, clip, step (then kohya's max-norm with --scale-weight-norms); returns the loss, the
    gradient norm, whether fp16's GradScaler skipped the step (a gradient overflowed: no update, a halved loss scale,
    no lr-schedule or EMA step, as accelerate's prepared scheduler does) and the max-norm's figures. Raises TrainingDiverged, on every process at once, on a non-finite loss on any process,
    a non-finite gradient without a scaler, or a loss scale that collapsed."""
    config, accelerator, step = run.config, run.accelerator, run.state.step + 1
    step_seed = _step_seed(config, step, accelerator.process_index)
    run.generator.manual_seed(step_seed)
    run.rng.seed(step_seed)
    torch.manual_seed(step_seed)  # LoRA dropout draws from the global generator
    micro_batches = [next(batches) for _ in range(config.optimization.grad_accum)]
    draws = [run.encoder.draw(indices, run.rng) for indices in micro_batches]
    if run.encoder.loader is not None:  # this step's images and the next step's, loading on worker threads
        upcoming = random.Random(_step_seed(config, step + 1, accelerator.process_index))
        following = [run.encoder.draw(indices, upcoming) for indices in batches.ahead(config.optimization.grad_accum)]
        run.encoder.loader.prefetch([d for micro in draws + following for d in micro])
    losses = []
    for micro, (indices, micro_draws) in enumerate(zip(micro_batches, draws)):
        latents, embeddings, masks = run.encoder.encode(micro_draws, run.generator)
        weights = _loss_weights(run, indices)
        sync = contextlib.nullcontext() if micro == config.optimization.grad_accum - 1 else accelerator.no_sync(run.model.unet)
        with sync, accelerator.autocast():
            loss = diffusion_loss(
                run.model.unet,
                run.model.noise_scheduler,
                latents,
                embeddings,
                run.config.objective,
                generator=run.generator,
                weights=weights,
                flow_matching=run.model.flow_matching,
                mask=masks if config.objective.masked_loss else None,
            )
        # backward even for a non-finite loss: the check below is collective, and DDP's backward is too
        accelerator.backward(loss / config.optimization.grad_accum)
        losses.append(loss.detach())
    grad_norm = accelerator.clip_grad_norm_(
        list(run.trainable.values()), config.optimization.max_grad_norm or math.inf
    )  # inf: measure, do not clip
    values, grad_norm, bad_processes = _step_numbers(run, losses, grad_norm)
    if bad_processes:
        value = next((v for v in values if not math.isfinite(v)), "non-finite")
        where = f" on process {', '.join(map(str, bad_processes))}" if accelerator.num_processes > 1 else ""
        raise TrainingDiverged(_diverged_message(step, f"the loss became {value}{where}", run))
    total = 0.0
    for value in values:
        total += value / config.optimization.grad_accum
    scaler = accelerator.scaler
    if scaler is None and not math.isfinite(grad_norm):  # with a scaler, an overflow only skips the step
        raise TrainingDiverged(_diverged_message(step, f"the gradient norm became {grad_norm}", run))
    run.optimizer.step()
    skipped = scaler is not None and accelerator.optimizer_step_was_skipped
    if skipped:
        _check_loss_scale(run, step, scaler.get_scale())
    else:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    norms = {}
    if config.optimization.scale_weight_norms and not skipped:  # kohya's max-norm after each step, before the EMA sees it
        models = {c: accelerator.unwrap_model(_component(run.model, c)) for c in run.model.trained}
        keys_scaled, average, largest = network.apply_max_norm(models, config.optimization.scale_weight_norms)
        norms = {"keys_scaled": keys_scaled, "average_key_norm": average, "max_key_norm": largest}
    if run.ema is not None and not skipped:
        run.ema.update(run.trainable, step)
    return total, grad_norm, skipped, norms


def _step_numbers(run: Run, losses: list[torch.Tensor], grad_norm) -> tuple[list[float], float, list[int]]:
    """The micro-batch losses, the gradient norm and the processes whose loss was not finite, read in one host
    synchronisation: each process sets its own flag and the flags are summed across processes, so a bad loss on any
    process stops every one of them (none is left waiting in a collective the others never reach)."""
    accelerator = run.accelerator
    stacked = torch.stack([loss.float() for loss in losses])
    flags = torch.zeros(accelerator.num_processes, device=stacked.device)
    flags[accelerator.process_index] = (~torch.isfinite(stacked)).any().float()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flags)
    norm = torch.as_tensor(grad_norm, device=stacked.device).float().reshape(1)
    numbers = torch.cat([stacked, norm, flags]).tolist()
    count = len(losses)
    return numbers[:count], numbers[count], [process for process, flag in enumerate(numbers[count + 1 :]) if flag]


# fp16's GradScaler halves its scale at each overflow (from 65536) and doubles it after 2000 clean steps. Below 1,
# an overflow means the unscaled fp16 gradients themselves pass 65504: no scale can save that run (from 65536 it
# takes 17 overflows in a row, more than the few of a normal start)
MIN_LOSS_SCALE = 1.0


def _check_loss_scale(run: Run, step: int, scale: float) -> None:
    if scale < MIN_LOSS_SCALE:
        raise TrainingDiverged(
            _diverged_message(
                step,
                f"the fp16 gradients kept overflowing until the loss scale fell to {scale:g} ({run.state.skipped_steps + 1} steps skipped)",
                run,
            )
        )


def _loss_weights(run: Run, indices: list[int]) -> torch.Tensor | None:
    """Each image's loss weight, as kohya weights them: --prior-loss-weight for regularization images, 1 for the
    others (None when there are none: the plain mean)."""
    if not any(run.records[index].is_reg for index in indices):
        return None
    weight = run.config.data.prior_loss_weight
    return torch.tensor([weight if run.records[index].is_reg else 1.0 for index in indices], device=run.accelerator.device)


def _diverged_message(step: int, what: str, run: Run) -> str:
    found = checkpoint.latest_checkpoint(Path(run.config.run.output_dir) / "checkpoints")
    kept = f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"
    hint = "--mixed-precision bf16 instead of fp16, " if run.config.base.mixed_precision == "fp16" else ""
    return (
        f"training stopped at step {step}: {what}; {kept}. Try {hint}a lower --lr (now {run.config.optimization.lr:g}) or --max-grad-norm 1"
    )


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
    trained = {component: _component(run.model, component) for component in run.model.trained}
    return network.extract_lora_state({c: run.accelerator.unwrap_model(model) for c, model in trained.items()})


def _save_checkpoint(run: Run) -> Path | None:
    run.accelerator.wait_for_everyone()
    path = None
    if run.accelerator.is_main_process:
        run.state.capture_rngs(run.rng, run.generator)
        files = outputs.lora_writers(lora_state(run), run.config, run.model.family, run.records, datasets=run.datasets)
        if run.ema is not None:
            files[ema.STATE_FILE] = run.ema.save
        path = checkpoint.save_checkpoint(
            Path(run.config.run.output_dir) / "checkpoints",
            run.state,
            run.trainable,
            run.optimizer,
            run.lr_scheduler,
            run.config.run.keep_checkpoints,
            files,
            scaler=run.accelerator.scaler,
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
    out = Path(run.config.run.output_dir)
    run.metrics.close()
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        for name, write in outputs.lora_writers(lora_state(run), run.config, run.model.family, run.records, datasets=run.datasets).items():
            write(out / name)
        if run.ema is not None:
            with run.ema.applied(run.trainable):
                averaged = lora_state(run)
            writers = outputs.lora_writers(
                averaged, run.config, run.model.family, run.records, suffix=outputs.EMA_SUFFIX, datasets=run.datasets
            )
            for name, write in writers.items():
                write(out / name)
        outputs.write_config_and_card(run.config, run.model.family, len(run.records), out)
    run.accelerator.wait_for_everyone()
    return out / outputs.main_file(run.config)
