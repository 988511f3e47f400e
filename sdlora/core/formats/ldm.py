"""Tables between the original LDM/SGM UNet names and diffusers' names.

Used for kohya files with LDM block names (`lora_unet_input_blocks_1_1_...`) and for single-file checkpoints
(`model.diffusion_model.input_blocks.1.1...`), which `inference.merge` streams. One generated table per layout
(SD1/SD2, SDXL) instead of hand-written key lists; a name outside the tables raises naming it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

from ...errors import UserError
from ..families import SD1, SDXL, UNET_SINGLE_FILE_PREFIX, ModelFamily
from .names import KOHYA_UNET_PREFIX, split_kohya_name


def _ldm_unet_table(levels: int, down_attention: tuple[int, ...], up_attention: tuple[int, ...], layers: int = 2) -> dict[str, str]:
    """Map LDM UNet block prefixes (underscored) to diffusers ones, for a UNet of `levels` resolution levels."""
    table = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
             "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
             "middle_block_0": "mid_block_resnets_0", "middle_block_1": "mid_block_attentions_0", "middle_block_2": "mid_block_resnets_1"}  # fmt: skip
    for level in range(levels):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            table[f"input_blocks_{index}_0"] = f"down_blocks_{level}_resnets_{layer}"
            if level in down_attention:
                table[f"input_blocks_{index}_1"] = f"down_blocks_{level}_attentions_{layer}"
        if level < levels - 1:
            table[f"input_blocks_{(level + 1) * (layers + 1)}_0_op"] = f"down_blocks_{level}_downsamplers_0_conv"
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            table[f"output_blocks_{index}_0"] = f"up_blocks_{level}_resnets_{layer}"
            if level in up_attention:
                table[f"output_blocks_{index}_1"] = f"up_blocks_{level}_attentions_{layer}"
        if level < levels - 1:
            upsampler_index = 2 if level in up_attention else 1
            table[f"output_blocks_{level * (layers + 1) + layers}_{upsampler_index}_conv"] = f"up_blocks_{level}_upsamplers_0_conv"
    return table


def ldm_table_of(family: ModelFamily) -> dict[str, str]:
    """The LDM <-> diffusers block table of a family's UNet (from its layout in the family table)."""
    levels, down_attention, up_attention = family.ldm_layout
    return _ldm_unet_table(levels, down_attention=down_attention, up_attention=up_attention)


LDM_SD1 = ldm_table_of(SD1)
LDM_SDXL = ldm_table_of(SDXL)
# layer names inside an LDM ResBlock -> diffusers ResnetBlock2D
LDM_RESNET_LAYERS = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}


# SD1 and SDXL name every block they share alike (an index is level * (layers + 1) + layer in both), so one table
# reads both; only the upsampler after an attention-less level differs (output_blocks_2_1_conv vs _2_2_conv)
# and both spellings are in it. No need to guess the architecture from a file that may adapt a few blocks.
LDM_KOHYA = {**LDM_SD1, **LDM_SDXL}
# first names that only LDM/SGM UNets have (diffusers' are conv_in, time_embedding, down_blocks, mid_block, ...)
_LDM_ONLY_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_2")


def has_ldm_names(keys: Iterable[str]) -> bool:
    return any(key.startswith(KOHYA_UNET_PREFIX) and key[len(KOHYA_UNET_PREFIX) :].startswith(_LDM_ONLY_BLOCKS) for key in keys)


def ldm_to_diffusers(name: str, table: Mapping[str, str], key: str) -> str:
    """`input_blocks_1_1_proj_in` -> `down_blocks_0_attentions_0_proj_in` (still underscored)."""
    for ldm_prefix in sorted(table, key=len, reverse=True):
        if name == ldm_prefix or name.startswith(ldm_prefix + "_"):
            rest = name[len(ldm_prefix) :].lstrip("_")
            target = table[ldm_prefix]
            if "_resnets_" in target and rest:
                if rest not in LDM_RESNET_LAYERS:
                    raise UserError(f"LoRA key {key!r} maps to no module (unknown ResBlock layer {rest!r})")
                rest = LDM_RESNET_LAYERS[rest]
            return f"{target}_{rest}" if rest else target
    raise UserError(f"LoRA key {key!r} maps to no module (unknown LDM block in {name!r})")


# ---------------------------------------------------------------- single-file (LDM) checkpoint keys, for merging
# Built from the same tables the kohya-LDM reader uses (LDM_SD1/_ldm_unet_table, LDM_RESNET_LAYERS), inverted.

# whole-checkpoint layers no LoRA targets, so the reader's tables lack them
_LDM_NORM_LAYERS = {"in_layers_0": "norm1", "out_layers_0": "norm2"}
_LDM_NORM_BLOCKS = {"out_0": "conv_norm_out"}


def ldm_unet_table_for_config(config: Mapping) -> dict[str, str]:
    """The LDM <-> diffusers block table of a UNet from its diffusers config (block types, layers per block)."""
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise UserError(f"UNet layers_per_block {layers!r} differs per block: no single-file layout for it")
    return _ldm_unet_table(
        len(config["block_out_channels"]),
        down_attention=tuple(i for i, kind in enumerate(config["down_block_types"]) if "Attn" in kind),
        up_attention=tuple(i for i, kind in enumerate(config["up_block_types"]) if "Attn" in kind),
        layers=layers,
    )


def ldm_unet_table_from_keys(keys: Iterable[str], prefix: str = UNET_SINGLE_FILE_PREFIX) -> dict[str, str]:
    """The block table of a single-file checkpoint's UNet, read off its keys (levels, layers, attention blocks)."""
    names = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
    if not names:
        raise UserError(f"no {prefix}* keys: not a Stable Diffusion single-file checkpoint")
    downsamplers = sorted({int(m.group(1)) for n in names if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n))})
    inputs = {int(m.group(1)) for n in names if (m := re.match(r"input_blocks\.(\d+)\.", n))}
    # a level is `layers` blocks then a downsampler, so the first downsampler sits at index layers + 1
    layers = downsamplers[0] - 1 if downsamplers else max(inputs, default=0)
    levels = len(downsamplers) + 1
    stride = layers + 1

    def has(start: str) -> bool:
        return any(n.startswith(start) for n in names)

    return _ldm_unet_table(
        levels,
        down_attention=tuple(level for level in range(levels) if has(f"input_blocks.{1 + level * stride}.1.")),
        up_attention=tuple(level for level in range(levels) if has(f"output_blocks.{level * stride}.1.")),
        layers=layers,
    )


def _dotted_ldm(prefix: str) -> str:
    """`input_blocks_3_0_op` -> `input_blocks.3.0.op` (LDM block names keep their underscores, indices do not)."""
    return re.sub(r"_(?=\d|op$|conv$)", ".", prefix)


@functools.lru_cache(maxsize=8)
def _dotted_blocks(table: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """(LDM block, its diffusers prefix with dots) for a block table, longest prefix first."""
    blocks = {**dict(table), **_LDM_NORM_BLOCKS}
    dotted = ((ldm, split_kohya_name(diffusers, diffusers)) for ldm, diffusers in blocks.items())
    return tuple(sorted(dotted, key=lambda pair: len(pair[1]), reverse=True))


def ldm_unet_key(diffusers_key: str, table: Mapping[str, str]) -> str:
    """`down_blocks.0.resnets.0.conv1.weight` -> `input_blocks.1.0.in_layers.2.weight` (no checkpoint prefix)."""
    best = next(
        (
            (ldm, dotted)
            for ldm, dotted in _dotted_blocks(tuple(table.items()))
            if diffusers_key == dotted or diffusers_key.startswith(dotted + ".")
        ),
        None,
    )
    if best is None:
        raise UserError(f"UNet weight {diffusers_key!r} has no single-file (LDM) name")
    ldm_prefix, dotted = best
    rest = diffusers_key[len(dotted) + 1 :]
    if ".resnets." in dotted:
        layer, _, param = rest.partition(".")
        inverse = {diffusers: ldm for ldm, diffusers in {**LDM_RESNET_LAYERS, **_LDM_NORM_LAYERS}.items()}
        if layer not in inverse:
            raise UserError(f"UNet weight {diffusers_key!r} has no single-file (LDM) name (unknown ResBlock layer {layer!r})")
        rest = f"{_dotted_ldm(inverse[layer])}.{param}"
    return f"{_dotted_ldm(ldm_prefix)}.{rest}" if rest else _dotted_ldm(ldm_prefix)
