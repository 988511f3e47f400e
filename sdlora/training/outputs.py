"""What a training run leaves for people: LoRA files with kohya's training metadata, config.toml, the model card."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..core.families import ModelFamily
from ..core.files import kohya_network_args, write_diffusers, write_kohya
from ..core.kinds import KIND_NAMES
from ..core.state import LoraState
from ..core.version import __version__
from ..models.loading import SINGLE_FILE_SUFFIXES, is_builtin_model, is_hub_id
from ..storage import output_rules
from ..storage.atomic import atomic_file, check_writable_target
from .config import DIFFUSERS_STEM, TrainConfig, to_toml
from .data import ImageRecord
from .datasets import DatasetSpec, dataset_sizes
from .optimizers import optimizer_label, parse_optimizer_args
from .validation import SAMPLES_DIR

DIFFUSERS_FILE = f"{DIFFUSERS_STEM}.safetensors"
# the --kind values diffusers' load_lora_weights can load (through peft); the others are written as kohya files only
DIFFUSERS_KINDS = ("lora", "dora")  # DoRA through peft's use_dora
EMA_SUFFIX = "_ema"  # the --ema-decay average's files: pytorch_lora_weights_ema.safetensors, NAME_ema.safetensors
STARTED_AT = str(int(time.time()))


def check_output_dir(out: Path) -> None:
    """The output folder must be creatable and writable; an existing file there is an error."""
    check_writable_target(out, is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to output folder {out}: permission denied")
    if not (out / output_rules.MARKER_FILE).exists():
        output_rules.write_marker(out, "train", __version__)  # a later run may write here again


def kohya_file(config: TrainConfig) -> str:
    """The kohya-format file's name: `<name>.safetensors`."""
    return f"{config.run.name}.safetensors"


def tag_frequency(records: Sequence[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {subset folder: {tag: count}} over the comma-separated tags of the captions,
    lower-cased as kohya counts them, regularization subsets included (a plain data folder is one subset, named by
    the folder); a folder used by several datasets is counted once."""
    frequency: dict[str, dict[str, int]] = {}
    first_dataset: dict[str, int] = {}
    for record in records:
        name = _subset_name(record)
        if first_dataset.setdefault(name, record.dataset) != record.dataset:
            continue
        tags = frequency.setdefault(name, {})
        for tag in (t.strip().lower() for t in record.caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return frequency


def dataset_dirs(records: Sequence[ImageRecord], reg: bool = False) -> dict[str, dict[str, int]]:
    """kohya's `ss_dataset_dirs` (or, `reg`, `ss_reg_dataset_dirs`): {subset folder: {"n_repeats": N, "img_count":
    M}}; a folder in a second dataset is named `folder (2)`, as kohya names it."""
    dirs: dict[str, dict[str, int]] = {}
    names: dict[tuple[int, str], str] = {}
    for record in records:
        if record.is_reg != reg:
            continue
        key = (record.dataset, _subset_name(record))
        if key not in names:
            name, number = key[1], 2
            while name in dirs:
                name, number = f"{key[1]} ({number})", number + 1
            names[key] = name
            dirs[name] = {"n_repeats": record.subset_repeats or record.repeats, "img_count": 0}
        dirs[names[key]]["img_count"] += 1
    return dirs


def _subset_name(record: ImageRecord) -> str:
    return record.subset or record.path.parent.name


def datasets_metadata(config: TrainConfig, records: Sequence[ImageRecord], datasets: Sequence[DatasetSpec]) -> list[dict]:
    """kohya's `ss_datasets` for a run from a dataset TOML: per dataset its batch size, images with repeats,
    resolution, bucketing and tag frequency, and per subset its folder (or metadata file) and options."""
    out = []
    for index, spec in enumerate(datasets):
        own = [record for record in records if record.dataset == index]
        (width, height), bucketing = dataset_sizes(spec, config.data)
        subsets: dict[tuple[str, bool], list[ImageRecord]] = {}
        for record in own:
            subsets.setdefault((record.subset, record.is_reg), []).append(record)
        entries = []
        for (name, is_reg), members in subsets.items():
            rules = members[0].rules
            entry = {
                "img_count": len(members), "num_repeats": members[0].subset_repeats or members[0].repeats, "color_aug": False,
                "flip_aug": rules.flip, "random_crop": rules.crop == "random", "shuffle_caption": rules.shuffle,
                "keep_tokens": rules.keep_tokens, "keep_tokens_separator": rules.keep_separator or None,
                "secondary_separator": rules.secondary_separator or None, "enable_wildcard": rules.wildcards,
            }  # fmt: skip
            # a fine-tuning subset is named by its metadata file (kohya's FineTuningDataset), the others by their folder
            entry.update({"metadata_file": name} if name.endswith(".json") else {"image_dir": name, "is_reg": is_reg})
            entries.append(entry)
        out.append({
            "is_dreambooth": not all(name.endswith(".json") for name, _ in subsets), "batch_size_per_device": spec.batch_size or config.data.batch_size,
            "num_train_images": sum(r.repeats for r in own if not r.is_reg), "num_reg_images": sum(r.repeats for r in own if r.is_reg),
            "resolution": [width, height], "enable_bucket": bool(bucketing), "min_bucket_reso": spec.min_bucket,
            "max_bucket_reso": spec.max_bucket, "tag_frequency": tag_frequency(own), "subsets": entries,
        })  # fmt: skip
    return out


def training_metadata(config: TrainConfig, records: Sequence[ImageRecord], datasets: Sequence[DatasetSpec] = ()) -> dict[str, str]:
    """kohya's `ss_*` training keys, which A1111/ComfyUI/civitai show for a LoRA (and `ss_datasets` for a run from
    a dataset TOML)."""
    num_images = sum(record.repeats for record in records if not record.is_reg)  # kohya counts an image once per repeat
    num_reg = sum(record.repeats for record in records if record.is_reg)
    return {
        "ss_output_name": config.run.name,
        "ss_sd_model_name": Path(config.base.model).name or config.base.model,
        "ss_training_started_at": STARTED_AT,
        "ss_learning_rate": f"{config.optimization.lr:g}",
        "ss_unet_lr": f"{config.optimization.lr:g}",
        "ss_text_encoder_lr": f"{config.optimization.lr_of('text_encoder') if config.network.train_text_encoder else 0:g}",
        "ss_max_train_steps": str(config.optimization.steps),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": str(num_reg),
        "ss_prior_loss_weight": f"{config.data.prior_loss_weight:g}",
        "ss_batch_size_per_device": str(config.data.batch_size),
        "ss_gradient_accumulation_steps": str(config.optimization.grad_accum),
        "ss_resolution": f"({config.data.resolution}, {config.data.resolution})",
        "ss_enable_bucket": str(config.data.buckets),
        "ss_flip_aug": str(config.data.flip),
        "ss_seed": str(config.run.seed),
        "ss_mixed_precision": config.base.mixed_precision,
        "ss_full_fp16": str(config.base.full_fp16),
        "ss_full_bf16": str(config.base.full_bf16),
        "ss_lr_scheduler": config.optimization.lr_scheduler,
        "ss_lr_warmup_steps": str(config.optimization.lr_warmup_steps),
        "ss_network_dropout": f"{config.network.network_dropout:g}",  # kohya's, on the down projection's output
        "ss_scale_weight_norms": f"{config.optimization.scale_weight_norms:g}" if config.optimization.scale_weight_norms else "None",
        "sdlora_dropout": f"{config.network.dropout:g}",  # peft's, on the layer's input
        "ss_noise_offset": f"{config.objective.noise_offset:g}",
        "ss_min_snr_gamma": f"{config.objective.snr_gamma:g}" if config.objective.snr_gamma else "None",
        "ss_loss_type": config.objective.loss,
        "ss_huber_schedule": config.objective.huber_schedule,
        "ss_huber_c": f"{config.objective.huber_c:g}",
        "ss_ip_noise_gamma": f"{config.objective.ip_noise_gamma:g}" if config.objective.ip_noise_gamma else "None",
        "ss_multires_noise_iterations": str(config.objective.multires_noise_iterations)
        if config.objective.multires_noise_iterations
        else "None",
        "ss_multires_noise_discount": f"{config.objective.multires_noise_discount:g}",
        "ss_zero_terminal_snr": str(config.objective.zero_terminal_snr),
        "ss_caption_dropout_rate": f"{config.data.caption_dropout:g}",
        "ss_optimizer": optimizer_label(config.optimization.optimizer, parse_optimizer_args(config.optimization.optimizer_args)),
        "ss_tag_frequency": json.dumps(tag_frequency(records), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_dirs(records), ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(dataset_dirs(records, reg=True), ensure_ascii=False),
        **(
            {"ss_datasets": json.dumps(datasets_metadata(config, records, datasets), ensure_ascii=False)}
            if config.data.dataset_config
            else {}
        ),
        "sdlora_preset": config.network.preset,
        "sdlora_ema_decay": f"{config.optimization.ema_decay:g}" if config.optimization.ema_decay else "None",
        "sdlora_trigger": config.data.trigger or "",
    }


# the options kohya passes as networks.lora's network_args, which its ss_network_args records as given (text)
_NETWORK_ARGS = (
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
    "block_lr_zero_threshold", "rank_dropout", "module_dropout",
)  # fmt: skip
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def training_network_args(config: TrainConfig) -> dict[str, str]:
    """kohya's network_args of this run (block ranks and rates, rank and module dropout, LoRA+; LyCORIS's factor,
    decompose_both and use_tucker) as its ss_network_args holds them: lists comma-separated; the ones at their default left out."""
    args = {}
    for name in _NETWORK_ARGS:
        value = getattr(config.network, name)
        if value:
            args[name] = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
    for name in _LORAPLUS:
        value = getattr(config.optimization, name)
        if value:
            args[name] = f"{value:g}"
    network = config.network  # LyCORIS's own network_args, by its names (lycoris/kohya.py create_network)
    if network.lokr_factor != -1:
        args["factor"] = str(network.lokr_factor)
    for name, given in (("decompose_both", network.lokr_decompose_both), ("use_tucker", network.use_tucker)):
        if given:
            args[name] = "True"
    return args


def lora_writers(
    state: LoraState,
    config: TrainConfig,
    family: ModelFamily,
    records: Sequence[ImageRecord],
    suffix: str = "",
    datasets: Sequence[DatasetSpec] = (),
) -> dict[str, Callable[[Path], None]]:
    """The run's two LoRA files by name, each as a function that writes it to a path: the diffusers file
    (save_lora_weights, alpha in its header) and the kohya file with the training metadata, both for `family`;
    `suffix` after each stem (the EMA's files). A --kind diffusers cannot load (`DIFFUSERS_KINDS`) gets the kohya
    file alone."""
    metadata = training_metadata(config, records, datasets)
    metadata["ss_network_args"] = json.dumps(kohya_network_args(state) | training_network_args(config))
    if config.run.save_precision != "fp32":  # kohya's save_precision: the files' weights rounded once, as kohya saves them
        state = state.to({"fp16": torch.float16, "bf16": torch.bfloat16}[config.run.save_precision])
    if suffix:
        metadata["ss_output_name"] = config.run.name + suffix
    writers = {
        DIFFUSERS_FILE.replace(".safetensors", suffix + ".safetensors"): lambda path: write_diffusers(state, path, family),
        kohya_file(config).replace(".safetensors", suffix + ".safetensors"): lambda path: write_kohya(state, path, metadata, family),
    }
    if not writes_diffusers(config):
        del writers[DIFFUSERS_FILE.replace(".safetensors", suffix + ".safetensors")]
    return writers


def writes_diffusers(config: TrainConfig) -> bool:
    """Whether the run writes the diffusers file: its --kind is one diffusers loads, with DoRA's magnitude per output
    row (peft's; diffusers has no per-input-column DoRA; NetworkConfig allows --dora-axis input with --kind dora only)."""
    return config.network.kind in DIFFUSERS_KINDS and config.network.dora_axis == "output"


def loader_notes(config: TrainConfig) -> list[str]:
    """The lines a run prints once where a loader people use would not load the file it writes, or not apply it
    exactly (each checked against that loader's code, tests/training/test_trained_kinds_in_loaders.py)."""
    notes = []
    if not writes_diffusers(config):
        why = (
            "diffusers (peft) has DoRA per output row only"
            if config.network.dora_axis == "input"
            else f"diffusers cannot load {KIND_NAMES[config.network.kind]} files"
        )
        flags = f"--kind {config.network.kind}" + (" --dora-axis input" if config.network.dora_axis == "input" else "")
        notes.append(f"{flags}: {why}, so this run writes the kohya file {kohya_file(config)} only (A1111, Forge, ComfyUI, sdlora load it)")
    if config.network.kind == "dora" and config.network.dora_axis == "output":
        notes.append(
            "--kind dora: the magnitude per output row (peft's, LyCORIS's default), which diffusers, LyCORIS and sdlora apply "
            "exactly and ComfyUI and A1111 do not (ComfyUI divides by the norm of the base weight, A1111 reads every "
            "magnitude per input column): for them, train with --dora-axis input"
        )
    if config.network.kind == "lokr" and config.network.use_tucker:
        notes.append(
            "--kind lokr --use-tucker: ComfyUI cannot apply LoKr's Tucker 3x3 convs (torch.kron refuses the layout of its "
            "rebuilt half; it logs an error and skips them); A1111, LyCORIS and sdlora apply them: leave out --use-tucker for ComfyUI"
        )
    return notes


def main_file(config: TrainConfig) -> str:
    """The run's first LoRA file: the diffusers file, or the kohya file for a --kind diffusers cannot load."""
    return DIFFUSERS_FILE if writes_diffusers(config) else kohya_file(config)


def write_config_and_card(config: TrainConfig, family: ModelFamily, num_images: int, out: Path) -> None:
    """config.toml (the effective config) and README.md (model card)."""
    with atomic_file(out / "config.toml") as tmp:
        tmp.write_text(to_toml(config), encoding="utf-8")
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(model_card(config, family, num_images, out), encoding="utf-8")


def model_card(config: TrainConfig, family: ModelFamily, num_images: int, out: Path) -> str:
    """The run's README.md: what it was trained on, its settings, its files and how to use it."""
    grids = sorted((out / SAMPLES_DIR).glob("step-*.png"))
    sample = f"![samples]({SAMPLES_DIR}/{grids[-1].name})\n" if grids else ""
    diffusers = writes_diffusers(config)
    diffusers_line = "- `pytorch_lora_weights.safetensors`: diffusers (`pipe.load_lora_weights(folder)`).\n" if diffusers else ""
    kind_note = "" if config.network.kind == "lora" else f" (a {KIND_NAMES[config.network.kind]} in LyCORIS's layout)"
    usage = (
        f'pipe.load_lora_weights("{out}")'
        if diffusers
        else f'# diffusers cannot load {KIND_NAMES[config.network.kind]}: sdlora merges it into the weights\nfrom sdlora import load_lora\nload_lora(pipe, "{out / kohya_file(config)}")'
    )
    trigger = f"Trigger word: **{config.data.trigger}** (put it in your prompt).\n" if config.data.trigger else "No trigger word.\n"
    return f"""---
{_base_model_line(config.base.model)}library_name: diffusers
tags: [stable-diffusion, lora, sdlora]
---
# {config.run.name}

A LoRA for Stable Diffusion trained with sdlora on {num_images} images from `{config.data.data_dir or config.data.dataset_config}`.
{trigger}
{sample}
| setting | value |
| --- | --- |
| base model | `{config.base.model}` |
| kind, rank / alpha | {KIND_NAMES[config.network.kind]}, {config.network.rank} / {config.network.alpha:g}{" (UNet: per block, kohya's block_dims)" if config.network.block_dims else ""} |
| layers | `{config.network.preset}`{" + text encoder" if config.network.train_text_encoder else ""} |
| steps x batch | {config.optimization.steps} x {config.data.batch_size} (accumulation {config.optimization.grad_accum}) |
| learning rate | {config.optimization.lr:g} ({config.optimization.lr_scheduler}, warm-up {config.optimization.lr_warmup_steps}) |
| resolution | {config.data.resolution}{" with aspect buckets" if config.data.buckets else ""} |
| mixed precision | {config.base.mixed_precision} |
| seed | {config.run.seed} |

## Files
{diffusers_line}- `{config.run.name}.safetensors`: A1111 / Forge (`models/Lora`), ComfyUI (`models/loras`), kohya's sd-scripts{kind_note}.
- `config.toml`: the exact settings; `sdlora train --config config.toml` repeats the run.
- `metrics.jsonl`: loss, learning rate and validation loss per step.

## Use with diffusers
```python
{_pipeline_code(config.base.model, family)}
{usage}
image = pipe("{(config.samples.validation_prompts or [config.data.trigger or "a picture"])[0]}").images[0]
```
"""


def _base_model_line(model: str) -> str:
    """`base_model:` for the hub's model card metadata: only a hub id belongs there, not a local path or `tiny`."""
    return f"base_model: {model}\n" if is_hub_id(model) else ""


def _pipeline_code(model: str, family: ModelFamily) -> str:
    """The lines that load the base model in plain diffusers (or sdlora, for its embedded test models)."""
    if is_builtin_model(model):
        what = "pretrained demo model" if model == "demo" else "random-weight test model"
        return f'from sdlora import load_pipeline\npipe = load_pipeline("{model}")  # sdlora\'s embedded {what}'
    loader = "from_single_file" if Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES else "from_pretrained"
    return f'from diffusers import {family.pipeline_class}\npipe = {family.pipeline_class}.{loader}("{model}")'
