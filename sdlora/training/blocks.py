"""kohya's UNet blocks (sd-scripts networks/lora.py): the block each adapted UNet layer is in, and the per-block
ranks, alphas and learning-rate weights of its network_args (`block_dims`, `block_alphas`, `conv_block_dims`,
`conv_block_alphas`, `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`).

kohya's block indexes (`get_block_index`, on its LoRA names):
- SD1/SD2 (diffusers names): 25 blocks; `down_blocks_i_{attentions,resnets}_j` is 1 + 3i + j, a down block's
  downsampler 1 + 3i + 2; the mid block 12; `up_blocks_i_{attentions,resnets}_j` 13 + 3i + j, an upsampler 13 + 3i + 2.
- SDXL (LDM names, as kohya's SDXL files): 23 blocks; `input_blocks_n` is 1 + n, `middle_block_n` 10 + n,
  `output_blocks_n` 13 + n (0 the time embedding and 22 the output, which carry no LoRA).
The learning-rate weights are down + mid + up in that order (`get_block_lr_weight`; SDXL adds 1.0 before and after);
a block whose weight is at or below `block_lr_zero_threshold` becomes 0, and a block at 0 gets no LoRA at all
(`remove_block_dims_and_alphas`). kohya fills a short down/up/mid list with 1 and cuts a long one with a warning;
sdlora refuses any length but the family's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from ..core.families import ModelFamily
from ..core.formats.writers import kohya_module_name
from ..errors import UserError
from .config import NetworkConfig

# kohya's LoRANetwork.NUM_OF_BLOCKS / NUM_OF_MID_BLOCKS and their SDXL_ forms: (down or up blocks, mid blocks)
SD_BLOCKS = (12, 1)
SDXL_BLOCKS = (9, 3)
_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")  # kohya's RE_UPDOWN

# kohya's get_block_list names for down_lr_weight / up_lr_weight, "name+offset" adding offset to each value
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_layout(family: ModelFamily) -> tuple[int, int]:
    """(down or up blocks, mid blocks) of a family's UNet in kohya's counting."""
    if family.denoiser != "unet":
        raise UserError(f"kohya's block ranks and learning-rate weights are for UNets; {family.label} has a {family.denoiser}")
    return SDXL_BLOCKS if family.kohya_unet_names == "ldm" else SD_BLOCKS


def block_count(family: ModelFamily) -> int:
    """How many values kohya's block_dims take: 25 for SD1/SD2, 23 for SDXL (the time embedding and the output too)."""
    updown, mid = block_layout(family)
    return updown * 2 + mid + (2 if family.kohya_unet_names == "ldm" else 0)


def block_index(module_path: str, family: ModelFamily) -> int:
    """kohya's block index of a UNet layer (`down_blocks.1.attentions.0.proj_in`), as its get_block_index computes it
    from the layer's kohya name."""
    name = "lora_unet_" + kohya_module_name("unet", module_path, family, module_path)
    if family.kohya_unet_names == "ldm":
        rest = name.removeprefix("lora_unet_")
        for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if rest.startswith(prefix):
                return first + int(rest.split("_")[2])
    else:
        match = _SD_UPDOWN.search(name)
        if match:
            direction, i, kind, j = match.groups()
            index = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
            return 1 + index if direction == "down" else block_layout(family)[0] + 1 + index
        if "mid_block_" in name:
            return block_layout(family)[0]
    raise RuntimeError(f"UNet layer {module_path} is in no block of kohya's")


def lr_weight_preset(name: str, count: int) -> list[float]:
    """kohya's named down/up weights (`get_block_lr_weight`'s get_list): cosine, sine, linear, reverse_linear or zeros,
    each optionally `+offset`, for `count` blocks."""
    base, _, offset_text = name.partition("+")
    try:
        offset = float(offset_text) if offset_text else 0.0
    except ValueError:
        raise UserError(f"block learning-rate weight {name!r}: the part after + must be a number") from None
    steps = [i / (count - 1) for i in range(count)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * count,
    }
    if base not in curves:
        raise UserError(f"block learning-rate weight {name!r}: use numbers or one of {', '.join(LR_WEIGHT_PRESETS)} (+offset)")
    return [value + offset for value in curves[base]]


def lr_weights(options: NetworkConfig, family: ModelFamily) -> list[float] | None:
    """Each block's learning-rate factor (kohya's get_block_lr_weight: down + mid + up, SDXL with 1.0 at both ends,
    values at or below the threshold 0); None without block weights."""
    if not options.block_lr_weights:
        return None
    updown, mid = block_layout(family)
    lists = []
    for name, count in (("down_lr_weight", updown), ("mid_lr_weight", mid), ("up_lr_weight", updown)):
        values = getattr(options, name)
        if not values:  # kohya: a list not given is 1.0 everywhere, the threshold not applied to it
            lists += [1.0] * count
            continue
        if len(values) != count:
            raise UserError(f"--{name.replace('_', '-')} has {len(values)} values; {family.label}'s UNet has {count} (kohya's count)")
        lists += [value if value > options.block_lr_zero_threshold else 0.0 for value in values]
    return [1.0, *lists, 1.0] if family.kohya_unet_names == "ldm" else lists


@dataclass(frozen=True)
class BlockPlan:
    """Each adapted UNet layer's rank and alpha, and each block's learning-rate factor (None: 1 everywhere)."""

    ranks: dict[str, tuple[int, float]]  # layer name -> (rank, alpha); a layer left out has no LoRA
    lr_weights: list[float] | None
    family: ModelFamily

    def lr_weight(self, layer_name: str) -> float:
        """The learning-rate factor of a UNet layer's block (kohya's get_lr_weight)."""
        return 1.0 if self.lr_weights is None else self.lr_weights[block_index(layer_name, self.family)]


def block_plan(unet: nn.Module, target_modules: list[str], options: NetworkConfig, family: ModelFamily) -> BlockPlan | None:
    """The ranks and alphas kohya's LoRANetwork gives the UNet's layers under block_dims or block learning-rate weights
    (None without them: every layer at --rank / --conv-rank). As networks/lora.py: Linear and 1x1 convs take
    block_dims (default: --rank for every block) and block_alphas (default --alpha); 3x3 convs conv_block_dims
    (default --conv-rank, else --rank: sdlora's --preset all has them) and conv_block_alphas; a block whose
    learning-rate factor is 0 gets rank 0, which leaves its layers out."""
    if not options.block_dims and not options.block_lr_weights:
        return None
    count = block_count(family)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(options, name)
        if values and len(values) != count:
            raise UserError(
                f"--{name.replace('_', '-')} has {len(values)} values; {family.label}'s UNet has {count} blocks (kohya's count)"
            )
    dims = options.block_dims or [options.rank] * count
    alphas = options.block_alphas or [options.alpha] * count
    conv_dims = options.conv_block_dims or [options.conv_rank or options.rank] * count
    conv_alphas = options.conv_block_alphas or [options.conv_alpha or options.alpha] * count
    weights = lr_weights(options, family)
    layers = dict(unet.named_modules())
    ranks = {}
    for name in target_modules:
        block = block_index(name, family)
        layer = layers[name]
        conv3x3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        rank, alpha = (conv_dims[block], conv_alphas[block]) if conv3x3 else (dims[block], alphas[block])
        if weights is not None and weights[block] == 0:
            rank = 0
        if rank:
            ranks[name] = (rank, alpha)
    if not ranks:
        raise UserError("the block ranks and learning-rate weights leave no UNet layer with a LoRA: raise some of them")
    return BlockPlan(ranks, weights, family)
