"""Where a diffusers weight sits in a single-file checkpoint (A1111/ComfyUI's `.safetensors` of a whole model).

The UNet has LDM/SGM names (`model.diffusion_model.input_blocks.4.1...`, from the tables in `ldm`). Text encoders
come in two layouts, as the family table says: transformers' own names under a prefix (SD1's CLIP-L, SDXL's first
encoder), or OpenCLIP's (SD2's encoder, SDXL's second), where q, k and v are row slices [0:H], [H:2H], [2H:3H] of one
fused `attn.in_proj_weight`, the MLP is `c_fc`/`c_proj`, and `text_projection` is stored for x @ P: transposed.
SD3's MMDiT has SAI's names (`model.diffusion_model.joint_blocks.N.x_block.attn.qkv`, from the tables in `mmdit`):
q, k and v are row thirds of `qkv`, and an AdaLayerNormContinuous stores its rows' halves the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ...errors import UserError
from ..families import UNET_SINGLE_FILE_PREFIX, TextEncoderSpec
from .ldm import ldm_unet_key
from .mmdit import mmdit_layer, rows_swapped
from .names import canonical_path

# transformers' CLIP layer -> OpenCLIP's (per residual block); q/k/v are handled as slices of in_proj
_OPENCLIP_LAYERS = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPENCLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class WeightSlot:
    """Where a weight is stored: the tensor's key, and (OpenCLIP single files) a row slice of it or a transposition."""

    key: str
    rows: tuple[int, int] | None = None  # the weight is these rows of the stored tensor (q, k or v of in_proj)
    transposed: bool = False  # the stored tensor is the weight transposed (text_projection)
    swapped: bool = False  # the stored rows' two halves are the weight's in the other order (SD3's continuous norms)

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The diffusers weight's shape, given the stored tensor's."""
        if self.rows is not None:
            return (self.rows[1] - self.rows[0], *stored[1:])
        return tuple(reversed(stored)) if self.transposed else tuple(stored)


def single_file_slot(
    component: str,
    diffusers_key: str,
    unet_table: Mapping[str, str],
    text_encoder: TextEncoderSpec | None,
    shapes: Mapping[str, tuple[int, ...]],
) -> WeightSlot:
    """Where `diffusers_key` of `component` sits in a single file whose tensor shapes are `shapes`; ValueError if
    the layouts sdlora knows have no place for it."""
    if component == "unet":
        return WeightSlot(UNET_SINGLE_FILE_PREFIX + ldm_unet_key(diffusers_key, unet_table))
    if component == "transformer":
        return _mmdit_target(diffusers_key, shapes)
    if text_encoder is None or text_encoder.component != component:
        raise UserError(f"{component} weights ({diffusers_key!r}) have no single-file name: the model has no {component}")
    path = canonical_path(component, diffusers_key, diffusers_key)
    if text_encoder.single_file_layout == "hf":
        # transformers' layout keeps its `text_model.` level in single files (SD1, SDXL's first encoder)
        return WeightSlot(text_encoder.single_file_prefix + path)
    return _openclip_target(text_encoder.single_file_prefix, path, shapes)


def _openclip_target(prefix: str, path: str, shapes: Mapping[str, tuple[int, ...]]) -> WeightSlot:
    if path == "text_projection.weight":
        return WeightSlot(prefix + "text_projection", transposed=True)
    match = _OPENCLIP_LAYER.fullmatch(path)
    if match is None:
        raise UserError(f"text-encoder weight {path!r} has no single-file name in OpenCLIP's layout")
    layer, name, param = match.groups()
    block = f"{prefix}transformer.resblocks.{layer}."
    if name.startswith("self_attn.") and name.removeprefix("self_attn.") in _QKV:
        fused = f"{block}attn.in_proj_{param}"
        if fused not in shapes:
            raise UserError(f"text-encoder weight {path!r}: the single file has no {fused}")
        hidden = shapes[fused][0] // 3
        start = _QKV.index(name.removeprefix("self_attn.")) * hidden
        return WeightSlot(fused, rows=(start, start + hidden))
    if name not in _OPENCLIP_LAYERS:
        raise UserError(f"text-encoder weight {path!r} has no single-file name in OpenCLIP's layout")
    return WeightSlot(f"{block}{_OPENCLIP_LAYERS[name]}.{param}")


def _mmdit_target(diffusers_key: str, shapes: Mapping[str, tuple[int, ...]]) -> WeightSlot:
    layer, _, param = diffusers_key.rpartition(".")
    found = mmdit_layer(layer)
    if found is None:
        raise ValueError(f"transformer weight {diffusers_key!r} has no name in SAI's MMDiT")
    sai, third = found
    key = f"{UNET_SINGLE_FILE_PREFIX}{sai}.{param}"
    if third is not None:
        if key not in shapes:
            raise ValueError(f"transformer weight {diffusers_key!r}: the single file has no {key}")
        width = shapes[key][0] // 3
        return WeightSlot(key, rows=(third * width, (third + 1) * width))
    weight_shape = shapes.get(f"{UNET_SINGLE_FILE_PREFIX}{sai}.weight", ())
    return WeightSlot(key, swapped=rows_swapped(sai, tuple(weight_shape)))
