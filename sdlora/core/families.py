"""Model families as data: what differs between Stable Diffusion 1, 2, XL and 3, in one table.

Code that must know which model it handles asks the family (its pipeline class, its denoiser (SD1/SD2/SDXL's
UNet, SD3's MMDiT transformer), text encoders, kohya names, metadata strings, single-file layout) instead of
assuming SD1. The `family_of_*` functions tell the family from a pipeline, a `model_index.json`, a UNet or
transformer config or a single-file checkpoint's keys.

The training resolution is not in the table: a model's own config says it (UNet sample size x VAE factor), which
also tells SD2's 512 px and 768 px models apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .state import LoraState


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: where it sits in the pipeline and in single-file checkpoints."""

    component: str  # the pipeline attribute and folder: text_encoder, text_encoder_2
    tokenizer: str  # its tokenizer's attribute and folder
    hidden_layer: int  # the hidden state the UNet reads: -1 the last (SD1, SD2), -2 the penultimate (SDXL)
    pooled: bool  # whether its pooled, projected embedding conditions the UNet too (SDXL's second encoder)
    kohya_prefix: str  # kohya's key prefix: lora_te_ when a model has one text encoder, lora_te1_/lora_te2_ for two
    single_file_prefix: str  # where its weights sit in a single-file checkpoint
    single_file_layout: str  # "hf": transformers' names; "openclip": resblocks with q/k/v fused in in_proj_weight
    architecture: str = "clip"  # "clip" (module paths under text_model.) or "t5" (SD3's T5-XXL: encoder.block...)
    optional: bool = False  # a pipeline may leave it out (SD3's T5: the pipeline then feeds zeros in its place)


@dataclass(frozen=True)
class ModelFamily:
    """Everything sdlora needs to know about one Stable Diffusion generation."""

    name: str  # sd1, sd2, sdxl, sd3
    label: str  # what messages and `sdlora inspect` call it
    pipeline_class: str  # the diffusers pipeline class that loads, saves LoRAs for and runs it
    denoiser: str  # the pipeline attribute and folder of the denoiser: unet, or transformer (SD3's MMDiT)
    text_encoders: tuple[TextEncoderSpec, ...]
    cross_attention_dim: int  # width of the text the denoiser attends to (SD3: the joint attention's text input, T5's width)
    time_ids: bool  # SDXL's extra conditioning on original size, crop and target size
    empty_prompt_zeros: bool  # an empty prompt conditions with zeros, not the encoded "" (SDXL's force_zeros_for_empty_prompt)
    buckets_by_default: bool  # aspect-ratio buckets unless told otherwise (SDXL was trained on them)
    # kohya's lora_unet_ names: "diffusers": lora_unet_down_blocks_0_...; "ldm": lora_unet_input_blocks_1_1_... (kohya's
    # SDXL); "mmdit": SAI's MMDiT names, q/k/v fused (kohya's SD3: lora_unet_joint_blocks_0_x_block_attn_qkv)
    kohya_unet_names: str
    ldm_layout: tuple[int, tuple[int, ...], tuple[int, ...]] | None  # UNet levels, levels with attention down and up (LDM names)
    ss_base_model_version: str  # kohya's metadata value, shown by A1111 and civitai
    modelspec_architecture: str  # the modelspec.architecture of a LoRA for it
    vae_fp32_when_half: bool  # its VAE overflows in fp16 and runs in fp32 when the rest is half precision
    single_file_marker: str  # a key prefix that only this family's single-file checkpoints have (SD3's, then SDXL's checked first)
    # other ss_base_model_version values of the family's files (kohya's SD3: one per model), recognised when read
    ss_base_model_aliases: tuple[str, ...] = ()
    objective: str = "diffusion"  # how it trains: "diffusion" (noise or v prediction) or "flow_matching" (SD3's velocity)

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components a LoRA can adapt: the denoiser, then each text encoder."""
        return (self.denoiser, *(spec.component for spec in self.text_encoders))

    @property
    def required_parts(self) -> tuple[str, ...]:
        """The subfolders a diffusers folder of this family must have (an optional text encoder may be missing)."""
        needed = [spec for spec in self.text_encoders if not spec.optional]
        return (self.denoiser, "vae", *(spec.component for spec in needed), *(spec.tokenizer for spec in needed), "scheduler")

    def text_encoder(self, component: str) -> TextEncoderSpec:
        for spec in self.text_encoders:
            if spec.component == component:
                return spec
        raise UserError(
            f"{self.label} models have no {component} (their text encoders: {', '.join(s.component for s in self.text_encoders)})"
        )


UNET_SINGLE_FILE_PREFIX = "model.diffusion_model."  # the denoiser's prefix in every family's single files (SD3's MMDiT too)
VAE_SINGLE_FILE_PREFIX = "first_stage_model."

SD1 = ModelFamily(
    name="sd1",
    label="SD1.x",
    pipeline_class="StableDiffusionPipeline",
    denoiser="unet",
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", -1, False, "lora_te_", "cond_stage_model.transformer.", "hf"),),
    cross_attention_dim=768,
    time_ids=False,
    empty_prompt_zeros=False,
    buckets_by_default=False,
    kohya_unet_names="diffusers",
    ldm_layout=(4, (0, 1, 2), (1, 2, 3)),
    ss_base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    vae_fp32_when_half=False,
    single_file_marker="cond_stage_model.transformer.",
)
# diffusers keeps SD2's OpenCLIP ViT-H encoder converted to CLIPTextModel without its last layer, so "last" is
# the penultimate layer of the original, as SD2 was trained
SD2 = ModelFamily(
    name="sd2",
    label="SD2.x",
    pipeline_class="StableDiffusionPipeline",
    denoiser="unet",
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", -1, False, "lora_te_", "cond_stage_model.model.", "openclip"),),
    cross_attention_dim=1024,
    time_ids=False,
    empty_prompt_zeros=False,
    buckets_by_default=False,
    kohya_unet_names="diffusers",
    ldm_layout=(4, (0, 1, 2), (1, 2, 3)),
    ss_base_model_version="sd_v2",
    modelspec_architecture="stable-diffusion-v2-512/lora",
    vae_fp32_when_half=False,
    single_file_marker="cond_stage_model.model.",
)
SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet",
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", -2, False, "lora_te1_", "conditioner.embedders.0.transformer.", "hf"),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", -2, True, "lora_te2_", "conditioner.embedders.1.model.", "openclip"),
    ),
    cross_attention_dim=2048,
    time_ids=True,
    empty_prompt_zeros=True,
    buckets_by_default=True,
    kohya_unet_names="ldm",
    ldm_layout=(3, (1, 2), (0, 1)),  # SDXL's first level has no attention, its last none on the way up
    ss_base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    vae_fp32_when_half=True,
    single_file_marker="conditioner.embedders.",  # SGM's conditioner: only SDXL single files have one
)
# SD3, SD3.5 Medium and Large: the MMDiT (joint blocks of a text and an image stream, SD3.5 Medium's blocks with a
# second image self-attention `attn2`), CLIP-L and CLIP-G (both with projection; their penultimate states joined and
# padded to T5's width) and the optional T5-XXL. kohya's sd-scripts writes `lora_unet_` + SAI's MMDiT names with q/k/v
# fused and `lora_te1_`/`lora_te2_`/`lora_te3_`; its ss_base_model_version is the model type (library/sd3_utils.py).
SD3 = ModelFamily(
    name="sd3",
    label="SD3",
    pipeline_class="StableDiffusion3Pipeline",
    denoiser="transformer",
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", -2, True, "lora_te1_", "text_encoders.clip_l.transformer.", "hf"),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", -2, True, "lora_te2_", "text_encoders.clip_g.transformer.", "hf"),
        TextEncoderSpec(
            "text_encoder_3",
            "tokenizer_3",
            -1,
            False,
            "lora_te3_",
            "text_encoders.t5xxl.transformer.",
            "hf",
            architecture="t5",
            optional=True,
        ),
    ),
    cross_attention_dim=4096,
    time_ids=False,
    empty_prompt_zeros=False,
    buckets_by_default=True,
    kohya_unet_names="mmdit",
    ldm_layout=None,
    ss_base_model_version="medium",
    modelspec_architecture="stable-diffusion-3-medium/lora",
    vae_fp32_when_half=False,
    single_file_marker="model.diffusion_model.joint_blocks.",
    ss_base_model_aliases=("5-medium", "5-large"),
    objective="flow_matching",
)
FAMILIES: tuple[ModelFamily, ...] = (SD1, SD2, SDXL, SD3)
BY_NAME = {family.name: family for family in FAMILIES}


def family_by_name(name: str) -> ModelFamily:
    if name not in BY_NAME:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


# ---------------------------------------------------------------- detection


def family_of_unet_config(config: Mapping) -> ModelFamily:
    """The family of a UNet from its diffusers config: SDXL's added time conditioning, else the text width.

    A UNet of another text width (the tiny test models) counts as SD1, whose architecture they copy.
    """
    if config.get("addition_embed_type") == "text_time":
        return SDXL
    return SD2 if config.get("cross_attention_dim") == SD2.cross_attention_dim else SD1


def family_of_transformer_config(config: Mapping) -> ModelFamily:
    """The family of a transformer denoiser from its diffusers config: SD3's MMDiT, or a one-line refusal."""
    if config.get("_class_name") == "SD3Transformer2DModel" or {"joint_attention_dim", "caption_projection_dim"} <= set(config):
        return SD3
    raise UserError(
        f"a transformer of class {config.get('_class_name', 'unknown')!r} is of no family sdlora knows (SD3's is SD3Transformer2DModel)"
    )


def family_of_denoiser_config(config: Mapping) -> ModelFamily:
    """The family of a denoiser config, UNet or transformer."""
    if config.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in config:
        return family_of_unet_config(config)
    return family_of_transformer_config(config)


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded diffusers pipeline."""
    if type(pipe).__name__.startswith("StableDiffusion3") or getattr(pipe, "transformer", None) is not None:
        return family_of_transformer_config(pipe.transformer.config)
    if type(pipe).__name__.startswith("StableDiffusionXL") or getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return family_of_unet_config(pipe.unet.config)


def family_of_model_index(index: Mapping, unet_config: Mapping | None = None) -> ModelFamily:
    """The family a `model_index.json` names; SD1 and SD2 share a pipeline class, so the UNet config tells them apart."""
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith("StableDiffusion3") or "transformer" in index:  # SD3 has a text_encoder_2 too: first
        return SD3
    if class_name.startswith("StableDiffusionXL") or "text_encoder_2" in index:
        return SDXL
    return family_of_unet_config(unet_config) if unet_config is not None else SD1


def family_of_folder(folder: str | Path) -> ModelFamily:
    """The family of a diffusers folder, from `model_index.json` and the denoiser's config."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    transformer_config = folder / "transformer" / "config.json"
    if "transformer" in index and transformer_config.is_file():
        return family_of_transformer_config(_read_json(transformer_config))
    unet_config = folder / "unet" / "config.json"
    return family_of_model_index(index, _read_json(unet_config) if unet_config.is_file() else None)


def family_of_single_file(keys: Iterable[str]) -> ModelFamily:
    """The family of a single-file checkpoint: SD3 from its MMDiT's joint blocks (with or without its text encoders),
    else from the text encoders its keys hold (SDXL, SD2, else SD1)."""
    keys = list(keys)
    for family in (SD3, SDXL, SD2, SD1):
        if any(key.startswith(family.single_file_marker) for key in keys):
            return family
    if not any(key.startswith(UNET_SINGLE_FILE_PREFIX) for key in keys):
        raise UserError(f"no {UNET_SINGLE_FILE_PREFIX}* keys: not a Stable Diffusion single-file checkpoint")
    # no text encoder at all: SDXL's UNet alone still has its added (time and pooled text) embedding
    return SDXL if any(key.startswith(UNET_SINGLE_FILE_PREFIX + "label_emb.") for key in keys) else SD1


def check_single_file_parts(keys: Iterable[str], family: ModelFamily, label: str, components: Iterable[str] | None = None) -> None:
    """Raise a one-line error if a single-file checkpoint lacks one of its family's text encoders (of `components`)."""
    keys = list(keys)
    wanted = set(family.components if components is None else components)
    for spec in (spec for spec in family.text_encoders if spec.component in wanted and not spec.optional):
        if not any(key.startswith(spec.single_file_prefix) for key in keys):
            raise UserError(
                f"{label} has no {spec.component} ({spec.single_file_prefix}* keys): {family.label} checkpoints need {_needed_encoders(family)}"
            )


def _needed_encoders(family: ModelFamily) -> str:
    """`all 2 text encoders`, or for a family with an optional one `text_encoder and text_encoder_2 (text_encoder_3 is optional)`."""
    needed = [spec.component for spec in family.text_encoders if not spec.optional]
    if len(needed) == len(family.text_encoders):
        return f"all {len(needed)} text encoders"
    optional = ", ".join(spec.component for spec in family.text_encoders if spec.optional)
    return f"{' and '.join(needed)} ({optional} is optional)"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


def denoiser_text_width(config: Mapping) -> int:
    """The width of the text a denoiser reads, from its config: a UNet's cross-attention, SD3's joint attention input."""
    return int(config["cross_attention_dim"] if "cross_attention_dim" in config else config["joint_attention_dim"])


def describe_model(family: ModelFamily, cross_attention_dim: int) -> str:
    """`SD1.x (cross-attention width 768)`, or the width alone for a model of no known family's width; SD3 models
    by their family (their text width is T5's, whatever the model)."""
    if family.denoiser != "unet":
        return f"{family.label} (text width {cross_attention_dim})"
    if cross_attention_dim == family.cross_attention_dim:
        return f"{family.label} (cross-attention width {cross_attention_dim})"
    return f"a Stable Diffusion model of cross-attention width {cross_attention_dim}"


# ---------------------------------------------------------------- which family a LoRA was made for

_CROSS_ATTENTION_WIDTH = {family.cross_attention_dim: family.label for family in FAMILIES if family.denoiser == "unet"}
# CLIP's hidden width per family with one text encoder (SD1: CLIP-L 768, SD2: OpenCLIP-H 1024)
_TEXT_HIDDEN_WIDTH = {768: SD1.label, 1024: SD2.label}
_BY_LABEL = {family.label: family for family in FAMILIES}


def _input_widths(state: LoraState, prefix: str, endings: tuple[str, ...]) -> list[int]:
    """The input widths of the modules at `prefix`...`endings` whose update knows it (an OFT's or IA3's may not)."""
    shapes = (m.weight_shape() for p, m in state.modules.items() if p.startswith(prefix) and p.endswith(endings))
    return [int(shape[1]) for shape in shapes if shape[1] is not None]


def guess_architecture(state: LoraState) -> str:
    """'SD1.x', 'SD2.x', 'SDXL', 'SD3' from tensor shapes, or 'unknown (...)' with the width seen."""
    if {"transformer", "text_encoder_3"} & set(state.components()):
        return SD3.label  # only SD3 has a transformer denoiser and a third text encoder
    if "text_encoder_2" in state.components():
        return SDXL.label
    widths = _input_widths(state, "unet.", ("attn2.to_k", "attn2.to_v"))
    if widths:
        return _CROSS_ATTENTION_WIDTH.get(widths[0], f"unknown (cross-attention width {widths[0]})")
    widths = _input_widths(state, "text_encoder.", ("q_proj", "k_proj", "v_proj"))
    if widths:
        return _TEXT_HIDDEN_WIDTH.get(widths[0], f"unknown (text-encoder width {widths[0]})")
    if any(".transformer_blocks.1." in path for path in state.modules):
        return SDXL.label  # only SDXL stacks several transformer blocks per attention
    return "unknown (no cross-attention or text-encoder module to measure)"


def lora_architecture(state: LoraState) -> str:
    """The architecture a LoRA was made for, as error messages name it (`SDXL (cross-attention width 2048)`)."""
    architecture = guess_architecture(state)
    widths = _input_widths(state, "unet.", ("attn2.to_k", "attn2.to_v"))
    if widths and not architecture.startswith("unknown"):
        return f"{architecture} (cross-attention width {widths[0]})"
    if architecture.startswith("unknown"):
        return f"an architecture sdlora cannot tell ({architecture.removeprefix('unknown').strip(' ()')})"
    return architecture


def family_of_lora(state: LoraState) -> ModelFamily | None:
    """The family a LoRA was made for: what its tensor shapes say, else what its kohya metadata says (a file written
    for a test model of no real width), else None. An SD3 LoRA of the CLIP encoders alone has SDXL's (or, CLIP-L
    alone, SD1's) shapes: its metadata tells it apart."""
    family = _BY_LABEL.get(guess_architecture(state))
    by_metadata = _family_of_metadata(state.metadata)
    if family is None or (by_metadata is SD3 and "unet" not in state.components()):
        family = by_metadata
    return family


def _family_of_metadata(metadata: Mapping[str, str]) -> ModelFamily | None:
    """The family kohya's `ss_base_model_version` (or, failing it, `modelspec.architecture`) names."""
    version = metadata.get("ss_base_model_version", "")
    family = next((f for f in FAMILIES if version == f.ss_base_model_version or version in f.ss_base_model_aliases), None)
    if family is None and metadata.get("modelspec.architecture", "").startswith("stable-diffusion-3"):
        family = SD3
    return family


# The 3x3 convs of every family's UNet (SD1, SD2, SDXL), by their module paths: conv_in / conv_out, a resnet's
# conv1 / conv2, a down- or upsampler's conv (conv_shortcut and SD1's proj_in / proj_out are 1x1)
_KERNEL_3X3 = re.compile(r"^unet\.(conv_in|conv_out|.*\.resnets\.\d+\.conv[12]|.*\.(downsamplers|upsamplers)\.\d+\.conv)$")


def unflattened_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A layer's weight shape from an update that stores a conv kernel flattened ([out, in * 9], as a LoHa without
    Tucker does), by the SD UNets' layer names; other shapes as they are."""
    if len(shape) == 2 and _KERNEL_3X3.match(path) and shape[1] % 9 == 0:
        return (shape[0], shape[1] // 9, 3, 3)
    return tuple(shape)
