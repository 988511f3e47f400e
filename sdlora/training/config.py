"""`TrainConfig`: every training option with its default and why, in one section per part of training, checked
when it is built; written back as TOML.

Each section is a frozen dataclass whose fields carry their help text and choices (`_opt`); the command line's flags,
config.toml's keys and the documentation's option reference are generated from them. Each part of the trainer is
handed only its own section (`config.data` to the data loaders, `config.objective` to the loss, ...). Option names
are unique across sections, so flags and config.toml keys stay flat, as kohya's and as before the sections.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..core.targets import parse_block_selection
from ..errors import UserError
from ..inference.samplers import find_sampler
from ..models.loading import ALLOW_PICKLE_HELP, MODEL_CONFIG_HELP, MODEL_HELP
from .optimizers import OPTIMIZER_NAMES, parse_optimizer_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS = ("attn", "attn-ff", "all")
KINDS = ("lora", "loha", "lokr", "dora")  # what --kind trains: training/network.py builds each through peft's own layers
DORA_AXES = ("output", "input")  # --dora-axis: network.DORA_AXES
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SAMPLE_VAE_TILING = ("auto", "on", "off")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
CACHE_MODES = ("memory", "disk", "off")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CROPS = ("center", "random")
# accelerate's tracker names; "all": every one installed; "none": only metrics.jsonl
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "all", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSSES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# flow matching (SD3): how the noise level is drawn, and how each sample's loss is weighted (the SD3 paper's names,
# as diffusers' training_utils and kohya's sd3_train_utils spell them)
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "sigmoid")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
ZERO_TERMINAL_SNR_EPSILON = (
    "--zero-terminal-snr needs v-prediction (--prediction-type v_prediction): at zero SNR the last timestep's input is "
    "pure noise, so an epsilon model learns nothing there and cannot recover the image from it"
)
# the diffusers-format file's stem (training/outputs.py's DIFFUSERS_FILE, which imports this module): --name must differ
DIFFUSERS_STEM = "pytorch_lora_weights"
# what a file name cannot hold on Windows (where most A1111 and ComfyUI users are), nor anywhere else
_NOT_IN_FILE_NAMES = frozenset('<>:"/\\|?*') | {chr(code) for code in range(32)}


def _opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    positional: bool = False,
    path: bool = False,
    may_be_name: bool = False,
) -> Any:
    """A field with its help text; `path`: it names a file or folder, which a config file gives relative to itself;
    `may_be_name`: the value may instead be a name (a hub id, a built-in model, a checkpoint of the run), so a config
    file's value is taken as a path beside the file only when it starts with '.' or exists there."""
    metadata = {"help": help, "choices": choices, "positional": positional, "path": path, "may_be_name": may_be_name}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class _Section:
    """Every field checked against its annotation and choices, then the section's own checks (`_check_values`)."""

    def __post_init__(self) -> None:
        for item in fields(self):  # types and choices first: the checks below compare and compute with the values
            value = getattr(self, item.name)
            expected = value_problem(type(self), item, value)
            _check(expected is None, item.name, value, expected or "")
        self._check_values()

    def _check_values(self) -> None:
        """Raise a one-line UserError naming the option for any value that cannot work (without reading files:
        what needs a file is checked when training starts)."""


@dataclass(frozen=True)
class DataConfig(_Section):
    """The training images, their captions, and how they are cut, batched and cached."""

    data_dir: str = _opt(
        "", "folder of images with .txt captions or a metadata.jsonl, or kohya's N_words subfolders", positional=True, path=True
    )
    dataset_config: str | None = _opt(
        None,
        "a kohya dataset TOML (or JSON, as sd-scripts' --dataset_config): [general], [[datasets]] and [[datasets.subsets]] "
        "with their own folders, repeats, captions, resolution and batch size, is_reg for regularization; instead of DATA_DIR",
        path=True,
    )
    reg_data: str | None = _opt(
        None,
        "folder of regularization (prior-preservation) images of the class, plain or N_class subfolders; each epoch they "
        "are repeated to as many samples as the training images, as kohya does",
        path=True,
    )
    prior_loss_weight: float = _opt(
        1.0, "weight of the regularization images' loss against the training images' (kohya's prior_loss_weight)"
    )
    caption: str | None = _opt(None, "caption for images that have none (or for all, if no captions exist)")
    caption_extension: str = _opt(".txt", "extension of the caption file beside each image (kohya's sets often use .caption)")
    trigger: str | None = _opt(None, "word prepended to every caption; the word that calls up the style")
    resolution: int | None = _opt(None, "training side in pixels; when not given, the model's own size (512 for SD1.5, 768 for SD2.x-v)")
    buckets: bool | None = _opt(
        None, "aspect-ratio buckets of about resolution^2 pixels instead of square crops (when not given: on for SDXL, off for SD1/SD2)"
    )
    min_bucket_reso: int | None = _opt(None, "shortest bucket side in pixels, as kohya's min_bucket_reso (default: resolution / 2)")
    max_bucket_reso: int | None = _opt(None, "longest bucket side in pixels, as kohya's max_bucket_reso (default: resolution * 2)")
    bucket_reso_steps: int | None = _opt(
        None, "bucket sides are multiples of this, as kohya's bucket_reso_steps (default: 64, or less for small resolutions)"
    )
    bucket_no_upscale: bool = _opt(
        False,
        "an image smaller than the bucket area keeps its own size (cropped to the step, never enlarged), as kohya's bucket_no_upscale",
    )
    crop: str = _opt("center", "crop when an image does not fit its bucket", CROPS)
    mask_dir: str | None = _opt(
        None,
        "folder of loss masks for --masked-loss: for each image a mask image of the same name (and subfolder), of the same "
        "size, white where the image trains and black where it does not (its red channel, as kohya's conditioning_data_dir)",
        path=True,
    )
    alpha_mask: bool = _opt(
        False,
        "the training images' alpha channels are their loss masks for --masked-loss (opaque trains, transparent does not; kohya's alpha_mask)",
    )
    flip: bool = _opt(False, "random horizontal flips; off when the style has handedness (text, logos)")
    val_split: float = _opt(0.0, "fraction of images held out for the validation loss (0 = none)")
    caption_dropout: float = _opt(0.0, "probability of training on an empty caption")
    # SD3's per-encoder dropout (kohya's sd3_train_network.py): each drawn per image per step, after the caches
    clip_l_dropout: float = _opt(
        0.0,
        "SD3: probability of zeroing CLIP-L's part of an image's text (its columns of the CLIP tokens and of the pooled "
        "embedding), per image per step, as kohya's --clip_l_dropout_rate",
    )
    clip_g_dropout: float = _opt(0.0, "SD3: as --clip-l-dropout, for CLIP-G's part (kohya's --clip_g_dropout_rate)")
    t5_dropout: float = _opt(
        0.0,
        "SD3: probability of zeroing T5's tokens of an image's text, per image per step (kohya's --t5_dropout_rate): "
        "teaches the LoRA to work without T5 too",
    )
    shuffle_captions: bool = _opt(
        False, "shuffle comma-separated caption tags each step (keeps the --keep-tokens first tags, and the trigger, in place)"
    )
    keep_tokens: int = _opt(
        0, "the first N comma-separated caption tags stay in place when shuffling and are never dropped (kohya's keep_tokens)"
    )
    tag_dropout: float = _opt(
        0.0, "probability of leaving out each caption tag after the kept ones, per step (kohya's caption_tag_dropout_rate)"
    )
    batch_size: int = _opt(1, "images per step per process")
    cache: str = _opt("memory", "cache VAE latents and text embeddings: memory, disk (OUT/cache) or off", CACHE_MODES)
    vae_batch_size: int = _opt(
        1,
        "images of one size per VAE call when filling the latent cache (kohya's vae_batch_size): faster on a GPU; batched "
        "latents may differ from one-by-one ones in the last bits (on the tiny model, on a CPU, means by up to 2.2e-6 of 1.8)",
    )
    workers: int = _opt(
        2,
        "threads that read, decode and crop the next step's images while the current step runs, when latents are not "
        "cached (--cache off); the images are the same as without them (0 = read in the step)",
    )

    def _check_values(self) -> None:
        if not self.data_dir and not self.dataset_config:
            raise UserError("data_dir is required: the folder of training images (or --dataset-config, a kohya dataset TOML)")
        if self.data_dir and self.dataset_config:
            raise UserError(
                f"pass DATA_DIR {self.data_dir} or --dataset-config {self.dataset_config}, not both: the dataset TOML names its folders"
            )
        if self.reg_data and self.dataset_config:
            raise UserError("--reg-data and --dataset-config: put the regularization folder in the TOML as a subset with is_reg = true")
        if self.mask_dir and self.alpha_mask:
            raise UserError(f"--mask-dir {self.mask_dir} and --alpha-mask are two mask sources: keep one")
        if self.mask_dir and self.dataset_config:
            raise UserError(
                "--mask-dir and --dataset-config: give each subset of the TOML its conditioning_data_dir (or alpha_mask = true)"
            )
        if self.reg_data and Path(self.reg_data).resolve() == Path(self.data_dir).resolve():
            raise UserError(f"--reg-data {self.reg_data} is the data folder: regularization images are other images of the class")
        if self.resolution is not None:
            _check(
                64 <= self.resolution <= 8192 and self.resolution % 8 == 0, "resolution", self.resolution, "a multiple of 8 from 64 to 8192"
            )
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) is not None:
                _check(getattr(self, name) >= 8, name, getattr(self, name), "at least 8")
        if self.min_bucket_reso and self.max_bucket_reso and self.min_bucket_reso > self.max_bucket_reso:
            raise UserError(f"--min-bucket-reso {self.min_bucket_reso} is above --max-bucket-reso {self.max_bucket_reso}")
        _check(self.vae_batch_size >= 1, "vae_batch_size", self.vae_batch_size, "at least 1")
        _check(
            math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0,
            "prior_loss_weight",
            self.prior_loss_weight,
            "zero or more",
        )
        _check(self.keep_tokens >= 0, "keep_tokens", self.keep_tokens, "zero or more")
        _check(self.workers >= 0, "workers", self.workers, "zero or more")
        _check(bool(self.caption_extension.strip(". ")), "caption_extension", self.caption_extension, "an extension such as .txt")
        for name in ("caption_dropout", "tag_dropout", "val_split"):
            _check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "in [0, 1)")
        for name in ("clip_l_dropout", "clip_g_dropout", "t5_dropout"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "in [0, 1]")


@dataclass(frozen=True)
class BaseModelConfig(_Section):
    """The base model, the precision it runs in and what trades compute for memory."""

    model: str = _opt("tiny", "the base model: " + MODEL_HELP, path=True, may_be_name=True)
    model_config: str | None = _opt(None, MODEL_CONFIG_HELP, path=True)
    vae: str | None = _opt(
        None,
        "a VAE to use instead of the model's: diffusers folder, .safetensors file or hub id (e.g. an fp16-fixed SDXL VAE)",
        path=True,
        may_be_name=True,
    )
    allow_pickle: bool = _opt(False, ALLOW_PICKLE_HELP)
    mixed_precision: str = _opt(
        "auto",
        "fp16 or bf16 autocast with fp32 LoRA weights, or no (fp32); auto: bf16 on a GPU that has it (Ampere and newer), "
        "fp16 with a loss scaler on one that does not (T4, V100, 20xx), no on a CPU (where bf16 is slower than fp32)",
        MIXED_PRECISION,
    )
    tf32: bool = _opt(
        True,
        "let the fp32 parts (the LoRA layers, the VAE of SDXL) use TF32 matrix products on Ampere and newer GPUs, as "
        "diffusers' --allow_tf32 and kohya do (a 10-bit mantissa in the products; several times faster); no effect on a CPU",
    )
    compile: bool = _opt(
        False,
        "compile the UNet with torch.compile (inductor): faster steps on a GPU after a compile of a minute or more at the "
        "start and at each new bucket size; needs a C compiler; worth it for runs of thousands of steps",
    )
    full_bf16: bool = _opt(
        False,
        "LoRA weights, gradients and optimizer state in bf16 too (kohya's --full_bf16; needs --mixed-precision bf16): faster "
        "and smaller, but updates below bf16's precision (about 1/256 of a weight) are lost, so it can learn less; off by default",
    )
    full_fp16: bool = _opt(
        False,
        "LoRA weights and gradients in fp16 with a loss scaler (kohya's --full_fp16; needs --mixed-precision fp16): as "
        "--full-bf16, for GPUs without bf16; overflows more easily",
    )
    gradient_checkpointing: bool | None = _opt(
        None,
        "recompute the UNet's (and trained text encoders') activations in the backward pass instead of keeping them: "
        "one more forward pass of compute (about a third more per step) for a fraction of the activation memory; default: on for SDXL at 1024 px and above "
        "(its step needs over 12 GB without it), off otherwise",
    )
    fp8_base: bool = _opt(
        False,
        "store the frozen UNet and text-encoder Linear/Conv weights as float8 (e4m3fn), each cast up to the run's "
        "precision as its layer runs (kohya's --fp8_base; works without --mixed-precision and on the CPU): they take half "
        "the memory of bf16, a quarter of fp32; costs a cast per layer per step and rounds each weight to 3 mantissa bits "
        "(held-out loss 0.4% off bf16 on the demo model); for a GPU the bf16 model barely fits (SDXL on 8-12 GB)",
    )
    t5_max_length: int = _opt(
        77,
        "SD3: tokens the T5 encoder reads of a caption (zero-padded to this): diffusers' SD3 training script's 77, which keeps "
        "the joint attention's text stream short; kohya's --t5xxl_max_token_length and the pipeline's generation use 256: "
        "raise it for captions longer than about 60 words",
    )
    no_t5: bool = _opt(
        False,
        "SD3: leave the T5 encoder out (its slot of the text is zeros, as StableDiffusion3Pipeline does without text_encoder_3): "
        "saves its memory (T5-XXL is 4.7B parameters, 9.5 GB in bf16) and its encoding time",
    )

    def _check_values(self) -> None:
        _check(1 <= self.t5_max_length <= 512, "t5_max_length", self.t5_max_length, "from 1 to 512 (T5's length)")
        if self.full_bf16 and self.full_fp16:
            raise UserError("--full-bf16 and --full-fp16: choose one")
        for flag, precision in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
            if getattr(self, flag) and self.mixed_precision not in (precision, "auto"):
                raise UserError(f"--{flag.replace('_', '-')} needs --mixed-precision {precision} (now {self.mixed_precision})")


@dataclass(frozen=True)
class NetworkConfig(_Section):
    """The LoRA: its kind, rank and alpha, which layers carry it, and where it starts from."""

    kind: str = _opt(
        "lora",
        "adapter kind: lora (plain low-rank B @ A); loha (LyCORIS LoHa: Hadamard product of two low-rank products, "
        "more expressive per parameter); lokr (LyCORIS LoKr: Kronecker product of a small and a low-rank half, very small "
        "files); dora (LoRA with a learnt magnitude per output row: DoRA, closer to full fine-tuning). "
        "All are written in kohya/LyCORIS's layout; the diffusers file only for lora and dora",
        KINDS,
    )
    rank: int = _opt(16, "LoRA rank: 4-8 for a light style, 32-128 for detailed subjects")
    alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha/rank")
    dropout: float = _opt(0.0, "dropout on the LoRA path; 0.05-0.1 against overfitting small sets")
    preset: str = _opt("attn", "which UNet layers get LoRA: attn, attn-ff, all (LoCon-style)", PRESETS)
    conv_rank: int | None = _opt(
        None, "rank of the 3x3 convs (resnets, down/upsamplers) in --preset all, as kohya's conv_dim; 4-16 is usual (default: --rank)"
    )
    conv_alpha: float | None = _opt(None, "alpha of the 3x3 convs in --preset all, as kohya's conv_alpha (default: --alpha)")
    lora_blocks: str | None = _opt(
        None,
        "SD3: only these joint blocks of the transformer get LoRA, as kohya's train_block_indices: indices and inclusive "
        "ranges, e.g. 0-11,20 (SD3.5 Medium has 24 blocks, 0-23; SD3.5 Large 38); default: every block. UNet models refuse it",
    )
    train_text_encoder: bool = _opt(False, "also train LoRA on the attention projections of the text encoder(s) (SDXL: both)")
    init_lora: str | None = _opt(
        None,
        "start from this LoRA file (diffusers, kohya or peft) instead of a fresh LoRA, to train it further; its layers and rank must be this run's (--preset, --rank, --train-text-encoder)",
        path=True,
    )
    network_dropout: float = _opt(
        0.0,
        "kohya's network_dropout: dropout on the down projection's output (A x) while training, against overfitting; "
        "0.1 is usual (--dropout is peft's, on the layer's input)",
    )
    rank_dropout: float = _opt(
        0.0,
        "kohya's rank_dropout: drop each rank of A x with this probability per image while training, the rest scaled by 1/(1-p); "
        "with --kind loha/lokr LyCORIS's: drop each output row of the update with this probability per forward pass",
    )
    module_dropout: float = _opt(
        0.0, "kohya's and LyCORIS's module_dropout: skip a module's whole update with this probability per forward pass while training"
    )
    rank_dropout_scale: bool = _opt(
        False, "LyCORIS's rank_dropout_scale (--kind loha/lokr): scale the rows --rank-dropout keeps by 1 / (kept fraction)"
    )
    lokr_factor: int = _opt(
        -1,
        "LyCORIS's factor (--kind lokr): split each dimension as (factor, dim / factor), the smaller first; -1 the most "
        "balanced split; a factor that does not divide a dimension takes the most balanced split within it (as LyCORIS). "
        "A small factor with a large rank trains a whole second half (bigger files)",
    )
    lokr_decompose_both: bool = _opt(
        False, "LyCORIS's decompose_both (--kind lokr): also factor the first half at --rank where that makes it smaller"
    )
    use_tucker: bool = _opt(
        False, "LyCORIS's use_tucker (--kind loha/lokr, --preset all): the 3x3 convs with a Tucker core (hada_t1/t2, lokr_t2)"
    )
    dora_axis: str = _opt(
        "output",
        "--kind dora: the learnt magnitude per output row (peft's and the DoRA paper's, LyCORIS's default "
        "wd_on_output=True; diffusers loads it, ComfyUI and A1111 apply it inexactly) or per input column (LyCORIS's "
        "wd_on_output=False: what ComfyUI and A1111 apply exactly; kohya file only)",
        DORA_AXES,
    )
    block_dims: list[int] = _opt(
        [],
        "kohya's block_dims: the rank of each UNet block's Linear and 1x1 conv layers, one per block in kohya's order (25 "
        "for SD1/SD2, 23 for SDXL); 0 leaves a block out",
    )
    block_alphas: list[float] = _opt([], "kohya's block_alphas: each UNet block's alpha, as many as --block-dims (default: --alpha)")
    conv_block_dims: list[int] = _opt(
        [], "kohya's conv_block_dims: each UNet block's 3x3-conv rank in --preset all (default: --conv-rank); 0 leaves a block's convs out"
    )
    conv_block_alphas: list[float] = _opt([], "kohya's conv_block_alphas: each UNet block's 3x3-conv alpha (default: --conv-alpha)")
    down_lr_weight: list[float] = _opt(
        [],
        "kohya's down_lr_weight: the UNet learning rate's factor for each down block, shallow to deep (12 for SD1/SD2, 9 "
        "for SDXL); a block at or below --block-lr-zero-threshold is not trained at all",
    )
    mid_lr_weight: list[float] = _opt([], "kohya's mid_lr_weight: the factor of the mid block (1 value for SD1/SD2, 3 for SDXL)")
    up_lr_weight: list[float] = _opt([], "kohya's up_lr_weight: the factor of each up block, deep to shallow (12 for SD1/SD2, 9 for SDXL)")
    block_lr_zero_threshold: float = _opt(
        0.0, "kohya's block_lr_zero_threshold: blocks whose learning-rate factor is at or below it get no LoRA"
    )

    def _check_values(self) -> None:
        if self.kind in ("loha", "lokr") and self.dropout:
            raise UserError(
                f"--dropout is LoRA's dropout on the layer input, which {self.kind} has not: leave it at 0 with --kind {self.kind}"
            )
        if self.dora_axis != "output" and self.kind != "dora":
            raise UserError(f"--dora-axis sets DoRA's magnitude axis: use it with --kind dora (now {self.kind})")
        if self.kind != "lora" and self.init_lora:
            raise UserError(f"--init-lora continues a plain LoRA; with --kind {self.kind} training starts fresh: drop --init-lora")
        _check(self.rank >= 1, "rank", self.rank, "at least 1")
        _check(math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive finite number")
        if self.lora_blocks is not None:
            parse_block_selection(self.lora_blocks)  # the syntax now; the block count when the model is loaded
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        self._check_kohya_values()
        if self.conv_rank is not None or self.conv_alpha is not None:
            if self.preset != "all":
                raise UserError(f"--conv-rank and --conv-alpha set the 3x3 convs, which only --preset all adapts (now {self.preset})")
            if self.conv_rank is not None:
                _check(self.conv_rank >= 1, "conv_rank", self.conv_rank, "at least 1")
            if self.conv_alpha is not None:
                _check(math.isfinite(self.conv_alpha) and self.conv_alpha > 0, "conv_alpha", self.conv_alpha, "a positive finite number")

    def _check_kohya_values(self) -> None:
        """kohya's network_args: dropouts in [0, 1), block lists of non-negative values (a list's length needs the
        model's family: training.blocks checks it when the model is loaded)."""
        for name in ("network_dropout", "rank_dropout", "module_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "in [0, 1)")
            if name == "network_dropout" and getattr(self, name) and self.kind in ("loha", "lokr"):
                raise UserError(f"--{name.replace('_', '-')} acts on LoRA's down projection, which {self.kind} has not: leave it at 0")
            if getattr(self, name) and self.kind == "dora":  # peft's DoRA runs lora_A on an identity to take the norm
                raise UserError(
                    f"--{name.replace('_', '-')} with --kind dora: peft's DoRA runs the down projection to measure the weight's norm, "
                    "which the dropout would change; use --kind lora or leave it at 0"
                )
        for name in ("block_dims", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight"):
            values = getattr(self, name)
            _check(all(math.isfinite(v) and v >= 0 for v in values), name, values, "a list of numbers, zero or more")
        for name in ("block_alphas", "conv_block_alphas"):
            values = getattr(self, name)
            _check(all(math.isfinite(v) and v > 0 for v in values), name, values, "a list of positive numbers")
        threshold = self.block_lr_zero_threshold
        _check(math.isfinite(threshold) and threshold >= 0, "block_lr_zero_threshold", threshold, "zero or more")
        if not self.block_dims and not self.block_lr_weights:
            given = next((name for name in ("block_alphas", "conv_block_dims", "conv_block_alphas") if getattr(self, name)), None)
            if given:  # kohya reads them only in its block mode (networks/lora.py create_network)
                raise UserError(
                    f"--{given.replace('_', '-')} takes effect with --block-dims or a block learning-rate weight: add one of them"
                )
        if (self.conv_block_dims or self.conv_block_alphas) and self.preset != "all":
            raise UserError(
                f"--conv-block-dims and --conv-block-alphas set the 3x3 convs, which only --preset all adapts (now {self.preset})"
            )
        if (self.block_dims or self.block_lr_weights) and self.kind in ("loha", "lokr"):
            raise UserError(
                f"block ranks and learning-rate weights are kohya's networks.lora options: train them with --kind lora or dora, not {self.kind}"
            )
        self._check_lycoris_values()

    def _check_lycoris_values(self) -> None:
        """LyCORIS's LoHa/LoKr arguments (training.network.LycorisOptions): each with a kind that has it."""
        if (self.lokr_factor != -1 or self.lokr_decompose_both) and self.kind != "lokr":
            raise UserError(f"--lokr-factor and --lokr-decompose-both split LoKr's halves: use them with --kind lokr (now {self.kind})")
        _check(
            self.lokr_factor == -1 or self.lokr_factor >= 1, "lokr_factor", self.lokr_factor, "-1 (the most balanced split) or 1 or more"
        )
        if self.use_tucker and self.kind not in ("loha", "lokr"):
            raise UserError(
                f"--use-tucker: peft's {self.kind} layers have no Tucker form of a conv (LoHa's and LoKr's have): use --kind loha or lokr"
            )
        if self.use_tucker and self.preset != "all":
            raise UserError(f"--use-tucker acts on the 3x3 convs, which only --preset all adapts (now {self.preset})")
        if self.rank_dropout_scale and self.kind not in ("loha", "lokr"):
            raise UserError("--rank-dropout-scale is LyCORIS's, for --kind loha or lokr (kohya's --rank-dropout always scales)")
        if self.kind == "loha" and self.rank_dropout and not self.rank_dropout_scale:
            raise UserError(
                "--rank-dropout with --kind loha: peft's LoHa scales the kept rows by 1 / (kept fraction), which LyCORIS does only "
                "with rank_dropout_scale: add --rank-dropout-scale"
            )

    @property
    def block_lr_weights(self) -> bool:
        """Whether any block learning-rate weight is given (kohya's block mode)."""
        return bool(self.down_lr_weight or self.mid_lr_weight or self.up_lr_weight)


@dataclass(frozen=True)
class ObjectiveConfig(_Section):
    """The noise-prediction loss: its target, weighting, noise and timesteps (kohya's names where it has them)."""

    prediction_type: str | None = _opt(None, "epsilon or v_prediction (default: the scheduler's)", PREDICTION_TYPES)
    snr_gamma: float | None = _opt(None, "min-SNR-gamma loss weighting; 5.0 is the usual value")
    noise_offset: float = _opt(0.0, "noise offset; 0.05-0.1 helps very dark/bright styles")
    loss: str = _opt(
        "l2",
        "loss between prediction and target: l2 (MSE, the usual); huber or smooth_l1 (kohya's pseudo-Huber forms) are pulled less by outliers, for noisy or inconsistent images",
        LOSSES,
    )
    huber_c: float = _opt(
        0.1, "Huber threshold of --loss huber / smooth_l1, in (0, 1]: where the loss turns from quadratic to linear; smaller is more robust"
    )
    huber_schedule: str = _opt(
        "snr",
        "Huber threshold per timestep: snr (L2-like at clean timesteps, --huber-c at noisy ones), exponential (1 at t=0 down to --huber-c) or constant (--huber-c)",
        HUBER_SCHEDULES,
    )
    ip_noise_gamma: float = _opt(
        0.0, "input-perturbation noise: extra noise in the UNet's input, not its target, against exposure bias; 0.1 is usual (0 = off)"
    )
    min_timestep: int = _opt(0, "lowest training timestep: raise it (e.g. 500) to leave fine detail alone and train composition and colour")
    max_timestep: int | None = _opt(
        None,
        "training timesteps are drawn from [--min-timestep, this) (default: the schedule's 1000): lower it (e.g. 500) to train detail and texture only",
    )
    zero_terminal_snr: bool = _opt(
        False,
        "rescale the training noise schedule to zero terminal SNR, for v-prediction only: lets the LoRA learn truly dark or bright images",
    )
    multires_noise_iterations: int = _opt(
        0, "levels of multi-resolution (pyramid) noise, 6-10 usual (0 = off): low-frequency noise for large changes of contrast or colour"
    )
    multires_noise_discount: float = _opt(
        0.3, "weight discount^i of pyramid noise level i, in (0, 1]; only with --multires-noise-iterations"
    )
    # flow matching (SD3): sigma drawn by --timestep-sampling, shifted; input (1 - sigma) x0 + sigma noise; target noise - x0
    timestep_sampling: str = _opt(
        "logit_normal",
        "flow matching (SD3): how the noise level sigma is drawn before --flow-shift: logit_normal (sigmoid of a normal, "
        "--logit-mean/--logit-std; diffusers' default, the SD3 paper's best), uniform (kohya's sd3_train.py default), "
        "mode (--mode-scale) or sigmoid (sigmoid of --sigmoid-scale x a normal, kohya's FLUX option)",
        TIMESTEP_SAMPLINGS,
    )
    logit_mean: float = _opt(0.0, "flow matching, --timestep-sampling logit_normal: the normal's mean (diffusers and kohya: 0)")
    logit_std: float = _opt(1.0, "flow matching, --timestep-sampling logit_normal: the normal's std (diffusers and kohya: 1)")
    mode_scale: float = _opt(1.29, "flow matching, --timestep-sampling mode: its scale (diffusers and kohya: 1.29)")
    sigmoid_scale: float = _opt(1.0, "flow matching, --timestep-sampling sigmoid: the normal's scale (kohya: 1)")
    flow_shift: float | None = _opt(
        None,
        "flow matching: shift of the drawn sigma, shift s / (1 + (shift - 1) s); above 1 trains noisier levels "
        "(composition), below 1 cleaner ones (detail). Default: the model scheduler's shift (3.0 for SD3), as diffusers "
        "trains; kohya's --training_shift defaults to 1 (none)",
    )
    flow_weighting: str = _opt(
        "none",
        "flow matching: loss weight per sample by its sigma: none (diffusers' and kohya's default), sigma_sqrt (1 / sigma^2) "
        "or cosmap (2 / (pi (1 - 2 sigma + 2 sigma^2)))",
        FLOW_WEIGHTINGS,
    )
    precondition_outputs: bool = _opt(
        False,
        "flow matching: compare the x0 the prediction implies with the image instead of the velocity with noise - x0 "
        "(diffusers' --precondition_outputs, on there by default; off in kohya): weighs each sample's loss by sigma^2",
    )
    masked_loss: bool = _opt(
        False,
        "weight each latent pixel's loss by the image's mask (--mask-dir, --alpha-mask, or a dataset TOML's "
        "conditioning_data_dir / alpha_mask), as kohya's masked_loss: only the unmasked part of each image is learnt",
    )

    def _check_values(self) -> None:
        _check(math.isfinite(self.noise_offset) and self.noise_offset >= 0, "noise_offset", self.noise_offset, "zero or more")
        if self.snr_gamma is not None:
            _check(math.isfinite(self.snr_gamma) and self.snr_gamma > 0, "snr_gamma", self.snr_gamma, "a positive number")
        _check(math.isfinite(self.huber_c) and 0 < self.huber_c <= 1, "huber_c", self.huber_c, "in (0, 1]")
        _check(math.isfinite(self.ip_noise_gamma) and self.ip_noise_gamma >= 0, "ip_noise_gamma", self.ip_noise_gamma, "zero or more")
        _check(self.min_timestep >= 0, "min_timestep", self.min_timestep, "zero or more")
        if self.max_timestep is not None:
            _check(self.max_timestep > self.min_timestep, "max_timestep", self.max_timestep, f"above --min-timestep {self.min_timestep}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise UserError(ZERO_TERMINAL_SNR_EPSILON)
        _check(self.multires_noise_iterations >= 0, "multires_noise_iterations", self.multires_noise_iterations, "zero or more")
        discount = self.multires_noise_discount
        _check(math.isfinite(discount) and 0 < discount <= 1, "multires_noise_discount", discount, "in (0, 1]")
        _check(math.isfinite(self.logit_std) and self.logit_std > 0, "logit_std", self.logit_std, "a positive number")
        _check(math.isfinite(self.logit_mean), "logit_mean", self.logit_mean, "a finite number")
        _check(math.isfinite(self.sigmoid_scale) and self.sigmoid_scale > 0, "sigmoid_scale", self.sigmoid_scale, "a positive number")
        # the SD3 paper's range (section 3.1): outside it the mode map is not monotonic and leaves [0, 1]; 0 is uniform
        _check(-1 <= self.mode_scale <= 2 / (math.pi - 2), "mode_scale", self.mode_scale, "in [-1, 1.75] (2 / (pi - 2))")
        if self.flow_shift is not None:
            _check(math.isfinite(self.flow_shift) and self.flow_shift > 0, "flow_shift", self.flow_shift, "a positive number")


@dataclass(frozen=True)
class OptimizationConfig(_Section):
    """The optimizer, its learning rates and schedule, how long to train, and the weights' moving average."""

    optimizer: str = _opt(
        "adamw",
        "adamw (torch), adamw8bit (bitsandbytes, CUDA only), prodigy (adapts its step size: --lr 1.0), adafactor (at a fixed --lr), "
        'lion (--lr 3-10x lower than AdamW\'s); pip install "sdlora[NAME]" installs one (adafactor comes with transformers)',
        OPTIMIZER_NAMES,
    )
    optimizer_args: list[str] = _opt(
        [],
        "key=value arguments for the optimizer, e.g. --optimizer-args d_coef=2 safeguard_warmup=True (values are Python "
        "literals; several after one flag as in kohya, the flag repeated, or quoted together; put DATA_DIR before them)",
    )
    lr: float = _opt(1e-4, "learning rate of the UNet LoRA; --optimizer prodigy: 1.0 (it scales Prodigy's step), lion: 3-10x below AdamW's")
    text_encoder_lr: float | None = _opt(None, "learning rate for the text encoder LoRA (default: lr / 2)")
    text_encoder_2_lr: float | None = _opt(None, "learning rate for the second text encoder's LoRA, SDXL only (default: --text-encoder-lr)")
    weight_decay: float = _opt(1e-2, "the optimizer's (decoupled) weight decay; Lion's usual one is 3-10x AdamW's")
    lr_scheduler: str = _opt("constant", "learning-rate schedule (diffusers get_scheduler)", LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "linear warm-up steps")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    steps: int = _opt(1000, "optimizer steps to train")
    epochs: int | None = _opt(
        None, "train this many epochs instead of --steps: an epoch is every image its repeats times, in batches (counted as kohya counts)"
    )
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum * processes)")
    loraplus_lr_ratio: float | None = _opt(
        None,
        "LoRA+ (kohya's loraplus_lr_ratio): the up projections (B, kohya's lora_up) learn at this many times the "
        "learning rate of the down ones; 16 is the paper's usual value",
    )
    loraplus_unet_lr_ratio: float | None = _opt(None, "LoRA+ ratio of the UNet's LoRA alone (default: --loraplus-lr-ratio)")
    loraplus_text_encoder_lr_ratio: float | None = _opt(None, "LoRA+ ratio of the text encoders' LoRA alone (default: --loraplus-lr-ratio)")
    scale_weight_norms: float | None = _opt(
        None,
        "kohya's scale_weight_norms: after each step, scale down every module whose update (alpha/r) B A has a norm above "
        "this (1.0 is usual); metrics.jsonl logs keys_scaled, average_key_norm and max_key_norm",
    )
    ema_decay: float | None = _opt(
        None,
        "also keep an exponential moving average of the LoRA weights with this decay (0.999 for runs of thousands of steps), "
        "saved beside the LoRA as NAME_ema.safetensors and pytorch_lora_weights_ema.safetensors: smoother, often cleaner",
    )

    def _check_values(self) -> None:
        for name in ("steps", "grad_accum"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "at least 1")
        if self.epochs is not None:
            _check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a positive finite number")
        for name in ("text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(self, name)
            if value is not None:
                _check(math.isfinite(value) and value > 0, name, value, "a positive finite number")
        for name in ("weight_decay", "max_grad_norm", "lr_warmup_steps"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, value, "zero or more")
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "scale_weight_norms"):
            value = getattr(self, name)
            if value is not None:
                _check(math.isfinite(value) and value > 0, name, value, "a positive finite number")
        if self.ema_decay is not None:
            _check(0.0 < self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in (0, 1), e.g. 0.999")
        # the optimizer's arguments: their syntax here; names and values the optimizer refuses when training starts
        # (that needs its package imported), before the model loads
        parse_optimizer_args(self.optimizer_args)

    def loraplus_ratio(self, component: str) -> float | None:
        """The LoRA+ ratio of one component's up projections, as kohya's networks/lora.py prepare_optimizer_params
        picks it (the component's own ratio, else loraplus_lr_ratio); None: no LoRA+."""
        own = self.loraplus_text_encoder_lr_ratio if component.startswith("text_encoder") else self.loraplus_unet_lr_ratio
        return own or self.loraplus_lr_ratio

    def lr_of(self, component: str) -> float:
        """The learning rate of one component's LoRA: `lr` for the UNet, the text encoders' own (or lr / 2)."""
        if not component.startswith("text_encoder"):  # the denoiser: the UNet, or SD3's transformer
            return self.lr
        first = self.text_encoder_lr or self.lr / 2
        return (self.text_encoder_2_lr or first) if component == "text_encoder_2" else first


@dataclass(frozen=True)
class RunConfig(_Section):
    """The run itself: its output folder and file name, its seed, and its checkpoints."""

    output_dir: str = _opt("", "folder for the LoRA files, checkpoints, samples and logs", path=True)
    name: str = _opt("lora", "file name of the kohya-format LoRA (<name>.safetensors) for A1111/ComfyUI")
    seed: int = _opt(42, "seed of data order, noise, timesteps and LoRA init")
    checkpoint_every: int = _opt(500, "steps between resumable checkpoints (0 = only at the end)")
    keep_checkpoints: int = _opt(3, "how many checkpoints to keep")
    save_precision: str = _opt(
        "fp32",
        "precision of the LoRA files' weights (kohya's save_precision): fp32 as trained, or fp16/bf16 for half-size files "
        "(each weight rounded once when written; checkpoints stay fp32)",
        SAVE_PRECISIONS,
    )
    resume: str | None = _opt(None, "resume from 'latest' or a checkpoint folder", path=True, may_be_name=True)
    dry_run: bool = _opt(
        False,
        "load the model, print the memory plan (the estimated accelerator memory of setup, the training step and "
        "sampling) and stop: nothing is cached, trained or written",
    )

    def _check_values(self) -> None:
        if not self.output_dir:
            raise UserError("--output is required: the folder to write the LoRA to")
        _check_name(self.name)
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "zero or more")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "at least 1")


@dataclass(frozen=True)
class SamplesConfig(_Section):
    """The validation loss and the sample images drawn along the way."""

    validate_every: int = _opt(250, "steps between sample images and validation loss (0 = only at the end)")
    validation_prompts: list[str] = _opt(
        [], "prompts for sample images (default: the trigger, or the first caption, unless --sample-prompts)"
    )
    sample_prompts: str | None = _opt(
        None,
        "a kohya sample-prompt file: one prompt per line with --n negative, --w/--h size, --d seed, --l guidance, --s steps, "
        "--ss sampler; each line is a sample image at every validation, saved with its settings",
        path=True,
    )
    sampler: str | None = _opt(
        None,
        'sampler of the sample images: an A1111 name ("DPM++ 2M Karras", "Euler a"), kohya\'s or a diffusers class (default: the model\'s)',
    )
    sample_steps: int = _opt(20, "denoising steps for sample images")
    sample_at_first: bool = _opt(
        False, "also draw the sample images before the first step (the base model, to compare against), as kohya's"
    )
    sample_seed: int = _opt(1234, "seed of the sample images, fixed so samples compare between steps")
    samples: bool = _opt(
        True,
        "draw sample images at each validation and at the end; --no-samples: the held-out loss only, which saves the "
        "sampling time and its memory peak (the whole pipeline on the GPU at once)",
    )
    sample_vae_tiling: str = _opt(
        "auto",
        "decode sample images with the VAE in tiles and one image at a time (diffusers' enable_vae_tiling/slicing): "
        "512 px tiles, blended where they overlap: under a third of the decoder's memory (0.76 against 3.0 GiB for a 1024 px "
        "SDXL image), with faint seams possible at tile edges; auto: from 1024x1024 pixels (SDXL's own size) up",
        SAMPLE_VAE_TILING,
    )

    def _check_values(self) -> None:
        _check(self.validate_every >= 0, "validate_every", self.validate_every, "zero or more")
        _check(self.sample_steps >= 1, "sample_steps", self.sample_steps, "at least 1")
        if self.sampler is not None:
            find_sampler(self.sampler)  # an unknown name lists the known ones


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """Where the metrics go besides OUT/metrics.jsonl."""

    report_to: str | None = _opt(
        None,
        "experiment tracker(s) beside OUT/metrics.jsonl: tensorboard (OUT/logs), wandb, comet_ml, mlflow, aim, all (every one installed) or none (default: tensorboard when installed)",
        REPORT_TO,
    )
    tracker_project: str = _opt(
        "sdlora", "project name the trackers file the run under (W&B/Comet project, MLflow experiment, OUT/logs/<name> for TensorBoard)"
    )

    def _check_values(self) -> None:
        _check(bool(self.tracker_project.strip()), "tracker_project", self.tracker_project, "a non-empty name")


def _section(title: str, default: type | None = None) -> Any:
    """A section of TrainConfig with its title (the help's group and the docs' heading); `default`: the section's
    class when every one of its options has a default."""
    if default is None:
        return field(metadata={"title": title})
    return field(default_factory=default, metadata={"title": title})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Options of `sdlora train`, by section. Defaults are for an SD1.5 style LoRA; each option says when to change it.

    From flat options (as flags and config.toml keys name them): `TrainConfig.from_options(data_dir="photos",
    output_dir="out", rank=8)`."""

    data: DataConfig = _section("Data and captions")
    base: BaseModelConfig = _section("Base model and precision", BaseModelConfig)
    network: NetworkConfig = _section("Network (the LoRA)", NetworkConfig)
    objective: ObjectiveConfig = _section("Objective (the loss)", ObjectiveConfig)
    optimization: OptimizationConfig = _section("Optimizer and schedule", OptimizationConfig)
    run: RunConfig = _section("Run: outputs, seed and checkpoints")
    samples: SamplesConfig = _section("Validation and samples", SamplesConfig)
    logging: LoggingConfig = _section("Logging", LoggingConfig)

    def __post_init__(self) -> None:
        """The checks that span sections (each section checked its own values when it was built)."""
        output_dir = Path(self.run.output_dir).resolve()
        for flag, folder in (("the data folder", self.data.data_dir), ("--reg-data", self.data.reg_data)):
            folder = Path(folder).resolve() if folder else None
            if folder is not None and (output_dir == folder or folder in output_dir.parents):
                raise UserError(
                    f"--output {self.run.output_dir} is inside {flag} {folder}: its sample images would become training data; choose another folder"
                )
        masks = "--mask-dir" if self.data.mask_dir else "--alpha-mask" if self.data.alpha_mask else None
        if self.objective.masked_loss and not (masks or self.data.dataset_config):
            raise UserError("--masked-loss needs masks: pass --mask-dir DIR (a mask image per image) or --alpha-mask (the images' alpha)")
        if masks and not self.objective.masked_loss:
            raise UserError(f"{masks} gives loss masks, which only --masked-loss uses: add --masked-loss (or drop {masks})")
        if self.network.kind == "dora" and self.base.fp8_base:  # peft's DoRA takes the norm of the stored (fp8) weight
            raise UserError("--kind dora renormalises the base weight, which --fp8-base stores in fp8: drop one of them")
        several_rates = self.network.block_lr_weights or any(self.optimization.loraplus_ratio(c) for c in ("unet", "text_encoder"))
        if self.optimization.optimizer == "prodigy" and several_rates:  # kohya: LoRA+ is not for Prodigy either
            raise UserError(
                "--optimizer prodigy takes one learning rate for every parameter: drop LoRA+ and the block learning-rate weights"
            )
        loraplus = any(self.optimization.loraplus_ratio(c) for c in ("unet", "text_encoder"))
        if loraplus and self.network.kind in ("loha", "lokr"):
            raise UserError(
                f"LoRA+ raises the rate of LoRA's up projection (B), which {self.network.kind} has not: use --kind lora or dora"
            )
        if self.optimization.scale_weight_norms and self.base.full_fp16:  # the optimizer's fp32 copies would undo it
            raise UserError(
                "--scale-weight-norms with --full-fp16: the fp32 master weights would undo each scaling; use --full-bf16 or neither"
            )
        if self.optimization.scale_weight_norms and self.network.kind != "lora":
            raise UserError(
                f"--scale-weight-norms bounds a LoRA's update B A (kohya's networks.lora); --kind {self.network.kind} has another form"
            )
        if self.optimization.optimizer == "prodigy" and self.network.train_text_encoder:  # Prodigy: one lr for all groups
            lrs = sorted({self.optimization.lr_of(part) for part in ("unet", "text_encoder", "text_encoder_2")})
            if len(lrs) > 1:
                raise UserError(
                    f"--optimizer prodigy takes one learning rate for every trained part, got {', '.join(f'{x:g}' for x in lrs)}: pass --text-encoder-lr equal to --lr"
                )

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """A config from flat options (`rank=8`, as flags and config.toml keys name them), each put in its section."""
        grouped = _grouped(options)
        return cls(**{name: section(**grouped.get(name, {})) for name, section in SECTIONS.items()})

    def replace(self, **options: Any) -> TrainConfig:
        """A copy with some flat options changed (each section checked again)."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in _grouped(options).items()}
        return dataclasses.replace(self, **changed)

    def to_dict(self) -> dict[str, Any]:
        """Every option by its flat name (as flags and config.toml keys name them), for trackers and metadata."""
        return {item.name: getattr(getattr(self, section), item.name) for section, item in option_fields()}


# each section's name in TrainConfig (config.toml's [table]) and its class
SECTIONS: dict[str, type] = {item.name: get_type_hints(TrainConfig)[item.name] for item in fields(TrainConfig)}


def option_fields() -> list[tuple[str, Field]]:
    """(section name, field) of every option, in the order of the sections and their fields."""
    return [(name, item) for name, section in SECTIONS.items() for item in fields(section)]


def section_title(name: str) -> str:
    """The title of the section `name` (the help's group heading)."""
    return next(item.metadata["title"] for item in fields(TrainConfig) if item.name == name)


# every option's section: option names are unique across sections, which keeps flags and config.toml keys flat
SECTION_OF: dict[str, str] = {item.name: name for name, item in option_fields()}
assert len(SECTION_OF) == len(option_fields()), "an option name is in two sections"


def _grouped(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat options by section; an unknown name is a one-line error."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if key not in SECTION_OF:
            raise UserError(f"unknown option {key!r} (see sdlora train --help)")
        grouped.setdefault(SECTION_OF[key], {})[key] = value
    return grouped


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"--{name.replace('_', '-')} {value!r} is invalid: it must be {expected}")


def _check_name(name: str) -> None:
    """--name is the stem of files in the output folder: a plain file name on every system, not the diffusers file's."""
    if not name.strip():
        raise UserError(f"--name {name!r} is empty: give the LoRA file's name, e.g. --name my_style")
    if "/" in name or "\\" in name:
        raise UserError(f"--name {name!r} is not a file name: it cannot hold / or \\ (the folder is --output)")
    if name in (".", ".."):
        raise UserError(f"--name {name!r} is not a file name: give the LoRA file's name, e.g. --name my_style")
    refused = next((char for char in name if char in _NOT_IN_FILE_NAMES), None)
    if refused is not None:
        raise UserError(
            f'--name {name!r} holds {refused!r}, which file names cannot hold on every system (none of < > : " / \\ | ? * or control characters)'
        )
    if name[-1] in ". ":
        raise UserError(f"--name {name!r} ends in {name[-1]!r}, which Windows drops from file names")
    longest = f"{name}_ema.safetensors"  # the EMA's kohya file, the longest name the run writes from it
    if len(longest.encode("utf-8")) > 255:
        raise UserError(
            f"--name is {len(name)} characters long: the file {name[:20]}..._ema.safetensors would pass the 255 bytes a file name may take"
        )
    for stem in (DIFFUSERS_STEM, DIFFUSERS_STEM + "_ema"):
        if name.lower() == stem:  # disks of Windows and macOS ignore letter case: the same file there
            raise UserError(
                f"--name {name!r} is the stem of the diffusers file {stem}.safetensors: the kohya file {name}.safetensors "
                "would replace it (letter case aside, which Windows and macOS disks ignore), leaving one file of two; choose another name"
            )


# ---------------------------------------------------------------- each value against its field's type


@functools.cache
def option_annotations(owner: type) -> dict[str, Any]:
    return get_type_hints(owner)  # the annotations are strings (`from __future__ import annotations`)


def _kind(annotation: Any) -> tuple[Any, bool]:
    """(bool | int | float | str | list[...], whether None is allowed) from a field's annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) != 1:
            raise TypeError(f"option annotation {annotation} has no checker: use one type, optionally | None")
        return args[0], True
    return annotation, False


def _fits(kind: Any, value: Any) -> bool:
    if get_origin(kind) is list:
        (element,) = get_args(kind)
        return isinstance(value, list) and all(_fits(element, item) for item in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    raise TypeError(f"option type {kind} has no checker: add it to training/config.py's _fits")


# what a value of each type is called: in Python, in TOML, and several of them with a TOML example
_KIND_NAMES = {
    bool: ("True or False", "true or false (a TOML boolean, without quotes)", "booleans", "[true, false]"),
    int: ("an integer", "an integer", "integers", "[1, 2]"),
    float: ("a number", "a number", "numbers", "[0.5, 1.0]"),
    str: ("a string", "a string (in quotes)", "strings", '["a", "b"]'),
}


def value_problem(owner: type, item: Field, value: Any, toml: bool = False) -> str | None:
    """What `value` must be as the field `item` of the dataclass `owner` (from its annotation and `choices`), worded
    for Python or, with `toml`, for a TOML file; None when it fits."""
    kind, optional = _kind(option_annotations(owner)[item.name])
    if value is None and optional and not toml:
        return None
    if not _fits(kind, value):
        if get_origin(kind) is list:
            (element,) = get_args(kind)
            _, _, plural, example = _KIND_NAMES[element]
            expected = f"a list of {plural}"
            if toml:
                expected += f", e.g. [{toml_value(value)}]" if _fits(element, value) else f", e.g. {example}"
        else:
            python_name, toml_name, _, _ = _KIND_NAMES[kind]
            expected = toml_name if toml else python_name
            if toml and isinstance(value, str) and kind is not bool:
                expected += " (without quotes)"
        return expected + (" or None" if optional and not toml else "")
    choices = item.metadata.get("choices")
    if choices and value not in choices:
        return "one of " + ", ".join(choices)
    return None


# the options that name files or folders (`path` in their metadata): relative to the file in a config file, and
# written absolute, so `--config OUT/config.toml` repeats the run from anywhere
PATH_OPTIONS = tuple(item.name for _, item in option_fields() if item.metadata["path"])


def to_toml(config: TrainConfig) -> str:
    """The effective config as TOML, one [table] per section (None values left out), written beside the trained
    LoRA; paths made absolute (for an option that may be a name, those that exist here: a hub id or built-in name
    stays as it is)."""
    lines = []
    for name in SECTIONS:
        lines += ([""] if lines else []) + [f"[{name}]"]
        section = getattr(config, name)
        for item in fields(section):
            value = getattr(section, item.name)
            if value is None:
                continue
            if item.metadata["path"] and value and (not item.metadata["may_be_name"] or Path(value).exists()):
                value = str(Path(value).resolve())
            lines.append(f"{item.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """`value` as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(v)}" for key, v in value.items()) + "}"
    if not isinstance(value, str):  # dates and times
        return str(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def toml_options(text: str, path: Path) -> dict[str, Any]:
    """The flat options of a config.toml's `text` (what `sdlora train --config` reads; `path` names the file in
    messages, and relative paths are relative to its folder): see `sdlora.config.load_toml`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML: {err}") from err
    options: dict[str, Any] = {}
    for key, value in _flat_entries(path, data):
        option = key.replace("-", "_")
        if option in options:
            raise UserError(f"{path}: {key} is given twice (at the top level and in [{SECTION_OF[option]}]): keep one")
        section = SECTIONS[SECTION_OF[option]]
        item = section.__dataclass_fields__[option]
        expected = value_problem(section, item, value, toml=True)  # here, to name the file: the section checks again
        if expected is not None:
            raise UserError(f"{path}: {key} = {toml_value(value)} must be {expected}")
        options[option] = _relative_to(path, item, value)
    return options


def _flat_entries(path: Path, data: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) of every option in the file, from the top level and from the [section] tables."""
    entries = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                owner = SECTION_OF.get(inner.replace("-", "_"))
                if owner is None:
                    raise UserError(f"{path}: unknown option {inner!r} in [{key}] (see sdlora train --help)")
                if owner != key:
                    raise UserError(f"{path}: {inner} is an option of [{owner}], not of [{key}]: move it there or to the top level")
                entries.append((inner, inner_value))
        elif key.replace("-", "_") in SECTION_OF:
            entries.append((key, value))
        else:
            raise UserError(f"{path}: unknown option {key!r} (see sdlora train --help)")
    return entries


def _relative_to(path: Path, item: Field, value: Any) -> Any:
    """A path option's value relative to the config file, so a dataset's train.toml works from anywhere; a name (a
    hub id, a built-in model, `latest`, a checkpoint of the run) stays, unless it is a path there."""
    if not item.metadata["path"] or not value or Path(value).expanduser().is_absolute():
        return value
    beside = path.parent / value
    if not item.metadata["may_be_name"] or value.startswith(".") or beside.exists():
        return str(beside.resolve())
    return value
