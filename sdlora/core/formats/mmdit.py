"""SAI's MMDiT names <-> diffusers' SD3Transformer2DModel names, and q/k/v LoRAs fused into the MMDiT's `qkv`.

SD3's original code (its single files, kohya's sd-scripts and so kohya's SD3 LoRA files, which ComfyUI reads as
`lora_unet_` + the single file's names) names the denoiser `joint_blocks.N.{context,x}_block...` with q, k and v in
one `attn.qkv` projection; diffusers splits it (`transformer_blocks.N.attn.to_q/to_k/to_v`, the context stream's
`add_q_proj/add_k_proj/add_v_proj`). One table (`BLOCK_LAYERS`, `TOP_LAYERS`, as diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` maps the weights) drives both directions; a name outside it raises.

The fused LoRA is exact, not a re-factoring: q/k/v LoRAs (D_i, U_i, alpha_i) become one of rank r_q + r_k + r_v
with the downs stacked and the ups block-diagonal, its alpha chosen so that alpha / rank is each part's scale (when
the parts' scales differ, each up is multiplied by its own scale and alpha = rank). A fused LoRA reads back as three
exact ones: the up split by rows, the down shared; where the up is block-diagonal (as this writer and kohya's
`split_qkv` make it), each part keeps only its own columns, so a file written here reads back as the LoRAs it came
from. An AdaLayerNormContinuous (the final layer's, and the context stream's in the last block, which has no MLP)
orders its output rows (scale, shift) in diffusers and (shift, scale) in SAI's code: its up rows swap halves.

The other additive kinds (LoHa, LoKr, full diffs, GLoRA) cannot be cut into row parts in their own factors; on these
layers their update becomes a full diff (`core.kinds.FullModule`), exact, which `sdlora convert --rank` can turn into
a LoRA. Kinds whose update depends on the layer's weight (DoRA, OFT, BOFT, IA3) are refused there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...errors import UserError
from ..kinds import KIND_NAMES, FullModule
from ..state import Adapter, LoraModule

# per joint block: SAI's layer -> diffusers' layers (three: q, k, v as row thirds of the fused projection)
BLOCK_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),  # SD3.5 Medium's second image self-attention
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",)),  # the last block's: (shift, scale) swapped
)
# outside the joint blocks: SAI's layer -> diffusers' layer
TOP_LAYERS: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("context_embedder", "context_embedder"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),  # (shift, scale) swapped
)
# the first names of SAI's MMDiT paths (diffusers' are transformer_blocks, pos_embed, time_text_embed, norm_out...)
MMDIT_FIRST_NAMES = ("joint_blocks", *dict.fromkeys(sai.split(".")[0] for sai, _ in TOP_LAYERS))
# the layers whose output rows are (shift, scale) in SAI's code and (scale, shift) in diffusers' (AdaLayerNormContinuous)
_SWAPPED = ("context_block.adaLN_modulation.1", "final_layer.adaLN_modulation.1")

_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_TO_DIFFUSERS_BLOCK = dict(BLOCK_LAYERS)
_TO_DIFFUSERS_TOP = dict(TOP_LAYERS)
# diffusers' layer -> (SAI's layer, its third of the fused rows or None)
_TO_SAI_BLOCK = {name: (sai, index if len(names) == 3 else None) for sai, names in BLOCK_LAYERS for index, name in enumerate(names)}
_TO_SAI_TOP = {name: sai for sai, name in TOP_LAYERS}


def mmdit_layer(path: str) -> tuple[str, int | None] | None:
    """A diffusers SD3 transformer layer (`transformer_blocks.3.attn.to_k`) -> its SAI MMDiT layer and, for q/k/v,
    which third of the fused rows it is (`joint_blocks.3.x_block.attn.qkv`, 1); None for a layer outside the tables."""
    match = _DIFFUSERS_BLOCK.match(path)
    if match is not None:
        found = _TO_SAI_BLOCK.get(match.group(2))
        return None if found is None else (f"joint_blocks.{match.group(1)}.{found[0]}", found[1])
    return (_TO_SAI_TOP[path], None) if path in _TO_SAI_TOP else None


def rows_swapped(sai_layer: str, weight_shape: tuple[int, ...]) -> bool:
    """Whether SAI's layer (with this stored weight shape) orders its output rows (shift, scale) where diffusers has
    (scale, shift): an AdaLayerNormContinuous, whose linear has twice as many rows as inputs."""
    return sai_layer.endswith(_SWAPPED) and len(weight_shape) == 2 and weight_shape[0] == 2 * weight_shape[1]


def is_mmdit_path(path: str) -> bool:
    """Whether a denoiser module path is in SAI's MMDiT names (`joint_blocks.0.x_block.attn.qkv`)."""
    return path.split(".", 1)[0] in MMDIT_FIRST_NAMES


def from_mmdit(sai_path: str, adapter: Adapter, key: str) -> dict[str, Adapter]:
    """One module under SAI's MMDiT name -> the diffusers modules it is (three for a fused qkv), exactly."""
    match = _BLOCK.match(sai_path)
    layer = match.group(2) if match else sai_path
    names = _TO_DIFFUSERS_BLOCK.get(layer) if match else (_TO_DIFFUSERS_TOP[layer],) if layer in _TO_DIFFUSERS_TOP else None
    if names is None:
        known = "joint_blocks.N." + ", ".join(sai for sai, _ in BLOCK_LAYERS) + ", " + ", ".join(sai for sai, _ in TOP_LAYERS)
        raise UserError(f"LoRA key {key!r} maps to no SD3 MMDiT layer sdlora knows (known: {known})")
    prefix = f"transformer_blocks.{match.group(1)}." if match else ""
    if len(names) == 3:
        return {prefix + names[third]: part for third, part in split_qkv(adapter, key).items()}
    if layer in _SWAPPED and _is_continuous_norm(adapter):
        adapter = swap_halves(adapter, key)
    return {prefix + names[0]: adapter}


def to_mmdit(modules: Mapping[str, Adapter]) -> dict[str, Adapter]:
    """Denoiser modules under diffusers' SD3 paths -> SAI's MMDiT paths, q/k/v fused exactly into one qkv LoRA."""
    converted: dict[str, Adapter] = {}
    fused: dict[str, dict[int, tuple[str, Adapter]]] = {}  # SAI qkv path -> {third: (diffusers path, adapter)}
    for path, adapter in modules.items():
        match = _DIFFUSERS_BLOCK.match(path)
        layer = match.group(2) if match else path
        if match and layer in _TO_SAI_BLOCK:
            sai, third = _TO_SAI_BLOCK[layer]
            sai_path = f"joint_blocks.{match.group(1)}.{sai}"
        elif not match and layer in _TO_SAI_TOP:
            sai, third, sai_path = _TO_SAI_TOP[layer], None, _TO_SAI_TOP[layer]
        else:
            known = "transformer_blocks.N." + ", ".join(_TO_SAI_BLOCK) + ", " + ", ".join(_TO_SAI_TOP)
            raise UserError(f"LoRA module transformer.{path} has no name in SD3's MMDiT, which kohya files need (known: {known})")
        if third is not None:
            fused.setdefault(sai_path, {})[third] = (path, adapter)
            continue
        if sai in _SWAPPED and _is_continuous_norm(adapter):
            adapter = swap_halves(adapter, f"transformer.{path}")
        converted[sai_path] = adapter
    for sai_path, parts in fused.items():
        converted[sai_path] = fuse_qkv(parts)
    return dict(sorted(converted.items()))


def _is_continuous_norm(adapter: Adapter) -> bool:
    """An AdaLayerNormContinuous's linear (2 x width rows) rather than an AdaLayerNormZero's (6 x width): the last
    block's context norm, and the final layer's."""
    shape = adapter.weight_shape()
    return shape[0] is not None and shape[1] is not None and shape[0] == 2 * shape[1]


def _is_plain_lora(adapter: Adapter) -> bool:
    return isinstance(adapter, LoraModule) and adapter.mid is None


def _full_diff(adapter: Adapter, key: str, what: str) -> torch.Tensor:
    """The update of an additive kind at weight 1, [out, in]; other kinds raise naming what needs their rows."""
    if not adapter.additive or len(adapter.weight_shape()) != 2 or None in adapter.weight_shape():
        raise UserError(
            f"LoRA module {key} is {KIND_NAMES[adapter.kind]}, whose update depends on the layer's weight, and {what}: "
            "sdlora reads and writes LoRA, LoHa, LoKr, full diffs and GLoRA there"
        )
    return adapter.delta()


def swap_halves(adapter: Adapter, key: str) -> Adapter:
    """The module with its output rows' two halves swapped, (shift, scale) <-> (scale, shift): a LoRA's up factor, or
    another additive kind's update as a full diff."""
    if _is_plain_lora(adapter):
        half = adapter.up.shape[0] // 2
        return LoraModule(adapter.down, torch.cat([adapter.up[half:], adapter.up[:half]]), adapter.alpha)
    diff = _full_diff(adapter, key, "an SD3 norm layer's rows (shift and scale in another order) must be reordered")
    half = diff.shape[0] // 2
    return FullModule(torch.cat([diff[half:], diff[:half]]))


def fuse_qkv(parts: Mapping[int, tuple[str, Adapter]]) -> Adapter:
    """q/k/v modules ({0: q, 1: k, 2: v}; any may be missing, its rows left zero) -> one module of the fused
    projection, exactly: for LoRAs, downs stacked, ups block-diagonal, alpha / rank equal to the parts' scale; for
    other additive kinds (or a mix), the three updates stacked as one full diff."""
    shapes = {tuple(adapter.weight_shape()) for _, adapter in parts.values()}
    if len(shapes) != 1:
        paths = ", ".join(path for path, _ in parts.values())
        raise UserError(f"LoRA modules {paths} have different shapes ({sorted(shapes)}): no fused qkv holds them")
    if not all(_is_plain_lora(adapter) for _, adapter in parts.values()):
        what = "q, k and v must fuse into SD3's qkv"
        diffs = {third: _full_diff(adapter, f"transformer.{path}", what) for third, (path, adapter) in parts.items()}
        zeros = torch.zeros(next(iter(diffs.values())).shape)
        return FullModule(torch.cat([diffs.get(third, zeros) for third in range(3)]))
    loras: dict[int, LoraModule] = {third: adapter for third, (_, adapter) in parts.items()}
    width = next(iter(loras.values())).up.shape[0]
    ordered = [loras[third] for third in sorted(loras)]
    rank = sum(lora.rank for lora in ordered)
    scales = {lora.scale for lora in ordered}
    same_scale = len(scales) == 1
    dtype = ordered[0].up.dtype
    up = torch.zeros(3 * width, rank, dtype=dtype)
    column = 0
    for third in sorted(loras):
        lora = loras[third]
        block = lora.up if same_scale else (lora.up.float() * lora.scale).to(dtype)
        up[third * width : (third + 1) * width, column : column + lora.rank] = block
        column += lora.rank
    down = torch.cat([lora.down for lora in ordered])
    # alpha / rank = the parts' own scale (their alphas summed, as their ranks are); else each up carries its scale
    alpha = float(sum(lora.effective_alpha for lora in ordered)) if same_scale else float(rank)
    return LoraModule(down, up, alpha)


def split_qkv(adapter: Adapter, key: str) -> dict[int, Adapter]:
    """A fused qkv module -> its q, k and v modules ({0: q, 1: k, 2: v}), exactly. A LoRA: up split by rows into
    thirds, down shared; where the up is block-diagonal, each part with only its own columns of up and rows of down,
    at the same scale (and a third whose rows are all zero, a part the fused LoRA left out, is left out). Another
    additive kind: its update's row thirds as full diffs."""
    rows = adapter.weight_shape()[0]
    if rows is None or rows % 3:
        factor = "up factor" if isinstance(adapter, LoraModule) else "update"
        raise UserError(
            f"LoRA module {key!r} is SD3's fused qkv, but its {factor} has {rows} rows, not three equal q/k/v parts: "
            "the file is damaged or not for SD3"
        )
    width = rows // 3
    if not _is_plain_lora(adapter):
        diff = _full_diff(adapter, key, "SD3's fused qkv must split into q, k and v")
        return {third: FullModule(diff[third * width : (third + 1) * width].clone()) for third in range(3)}
    # a 1x1-conv spelling ([r, in, 1, 1]) of the Linear's LoRA, flattened
    lora = adapter if adapter.down.ndim == 2 else LoraModule(adapter.down.flatten(1), adapter.up.flatten(1), adapter.alpha)
    thirds = [lora.up[third * width : (third + 1) * width] for third in range(3)]
    columns = [torch.nonzero(third.abs().sum(dim=0)).flatten() for third in thirds]
    used = torch.cat(columns)
    if len(used) and len(used) == len(set(used.tolist())):
        # each part keeps the fused scale: alpha_i / r_i = alpha / r
        return {
            index: LoraModule(lora.down[c], third[:, c], lora.effective_alpha * len(c) / lora.rank)
            for index, (c, third) in enumerate(zip(columns, thirds, strict=True))
            if len(c)
        }
    return {index: LoraModule(lora.down, third, lora.effective_alpha) for index, third in enumerate(thirds)}
