"""Which layers of a model an adapter covers: the UNet presets and the text encoders' projections (training's
`--preset` and `--train-text-encoder`, and what `sdlora extract` takes from a fine-tuned model).

UNet presets (`unet_target_modules` resolves them to exact module names on a given UNet; only nn.Linear and
nn.Conv2d layers are ever chosen, and conv_in, conv_out, time_embedding and add_embedding never are):

- `attn`: the attention projections `to_q`, `to_k`, `to_v`, `to_out.0` of every attention (`attn1` self,
  `attn2` cross) inside the transformer blocks of the down, mid and up blocks. 8 per transformer block.
- `attn-ff`: `attn` plus the feed-forward `ff.net.0.proj` (GEGLU input) and `ff.net.2` of each transformer
  block, and the `proj_in` / `proj_out` of each `Transformer2DModel` (1x1 convs in SD1, Linear in SD2/SDXL).
- `all` (LoCon-style, as kohya's conv LoRA): every Linear and Conv2d inside the down/mid/up blocks'
  `attentions` (the `attn-ff` set) and `resnets` (`conv1`, `conv2` 3x3, `time_emb_proj`, `conv_shortcut` 1x1),
  plus the `downsamplers` / `upsamplers` convs (3x3).

The text encoder (`--train-text-encoder`) gets LoRA on CLIP's `q_proj`, `k_proj`, `v_proj`, `out_proj`; `extract`
also takes its MLP's `fc1` / `fc2`, as kohya's extract_lora_from_models.py does. Training leaves out the layers
after the one its family reads (SDXL's first encoder is read at its penultimate layer): a LoRA there would change
nothing and get no gradient, which DDP refuses (kohya's sdxl_train.py freezes that layer for the same reason).
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import UserError
from .families import TextEncoderSpec
from .matching import ADAPTABLE_LAYERS, base_layers

_ATTENTION = r"\.transformer_blocks\.\d+\.attn\d+\.(to_q|to_k|to_v|to_out\.0)$"
_FEED_FORWARD = r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$"
_PROJECTIONS = r"\.attentions\.\d+\.(proj_in|proj_out)$"
_BLOCK_LAYERS = r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(attentions|resnets|downsamplers|upsamplers)\.\d+\."

# preset -> regular expressions searched in full UNet module names (a Linear or Conv2d matching any is adapted)
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (_ATTENTION,),
    "attn-ff": (_ATTENTION, _FEED_FORWARD, _PROJECTIONS),
    "all": (_BLOCK_LAYERS,),
}
# SD3's MMDiT (SD3Transformer2DModel): the same three presets over its joint blocks. attn: both streams' projections
# (the image's to_q/k/v/to_out.0, the text's add_q/k/v_proj/to_add_out) and SD3.5 Medium's attn2; attn-ff: plus both
# streams' MLPs; all: every Linear of the blocks, the adaLN modulations (norm1.linear, norm1_context.linear) included,
# as kohya's sd3 LoRA (networks/lora_sd3.py) adapts them
_MMDIT_ATTENTION = r"^transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
_MMDIT_FEED_FORWARD = r"^transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)$"
MMDIT_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (_MMDIT_ATTENTION,),
    "attn-ff": (_MMDIT_ATTENTION, _MMDIT_FEED_FORWARD),
    "all": (r"^transformer_blocks\.\d+\.",),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODER_MLP = ("fc1", "fc2")
# the index of the CLIP transformer layer a module sits in (names with or without `text_model.`)
_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


_JOINT_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def parse_block_selection(text: str) -> tuple[int, ...] | None:
    """`--lora-blocks` in kohya's train_block_indices syntax (networks/lora_sd3.py's parse_block_selection):
    comma-separated indices and inclusive ranges, "0-11,20" -> (0, ..., 11, 20); "all" -> None (every block).
    Anything else is a one-line UserError."""
    text = text.strip()
    if text == "all":
        return None
    selected: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UserError(f"--lora-blocks {text!r}: {part.strip()!r} is not a block index or range: write e.g. 0-11,20")
        start, end = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if start > end:
            raise UserError(f"--lora-blocks {text!r}: the range {start}-{end} runs backwards: write {end}-{start}")
        selected.update(range(start, end + 1))
    return tuple(sorted(selected))


def unet_target_modules(unet: nn.Module, preset: str, blocks: str | None = None) -> list[str]:
    """The full names of the denoiser's Linear/Conv2d layers that `preset` adapts (see the module docstring; SD3's
    transformer by `MMDIT_PRESETS`), in SD3's transformer only in the joint blocks `blocks` selects (`--lora-blocks`,
    `parse_block_selection`; a UNet has no such row of blocks, and is refused)."""
    if preset not in PRESETS:
        raise UserError(f"unknown LoRA preset {preset!r}: use one of {', '.join(PRESETS)}")
    layers = base_layers(unet)
    mmdit = any(name.startswith("transformer_blocks.") for name in layers)  # SD3's transformer, not a UNet
    patterns = [re.compile(p) for p in (MMDIT_PRESETS if mmdit else PRESETS)[preset]]
    names = [name for name, layer in layers.items() if isinstance(layer, ADAPTABLE_LAYERS) and any(p.search(name) for p in patterns)]
    if not names:
        raise UserError(f"LoRA preset {preset!r} matches no layer of this UNet ({type(unet).__name__}): is it a Stable Diffusion UNet?")
    selected = parse_block_selection(blocks) if blocks is not None else None
    if selected is not None:
        if not mmdit:
            raise UserError(
                f"--lora-blocks picks joint blocks of SD3's transformer; a UNet ({type(unet).__name__}) has none: leave it out and choose layers with --preset"
            )
        count = 1 + max(int(_JOINT_BLOCK.match(name)[1]) for name in layers if _JOINT_BLOCK.match(name))
        if selected[-1] >= count:
            raise UserError(
                f"--lora-blocks {blocks}: block {selected[-1]} is beyond this transformer's {count} joint blocks (0-{count - 1})"
            )
        names = [name for name in names if int(_JOINT_BLOCK.match(name)[1]) in selected]
    return names


def text_encoder_target_modules(
    text_encoder: nn.Module, targets: tuple[str, ...] = TEXT_ENCODER_TARGETS, spec: TextEncoderSpec | None = None
) -> list[str]:
    """The full names of the CLIP text encoder's layers named `targets` (default: the attention projections
    q/k/v/out_proj), as in its module tree. With `spec` (training), only those whose output reaches the UNet: the
    transformer layers up to the hidden layer it reads, all of them when its pooled output conditions it too."""
    names = [
        name for name, layer in base_layers(text_encoder).items() if isinstance(layer, nn.Linear) and name.rpartition(".")[2] in targets
    ]
    if spec is not None:
        names = [name for name in names if reaches_the_unet(name, text_encoder, spec)]
    if not names:
        raise UserError(f"the text encoder ({type(text_encoder).__name__}) has no {'/'.join(targets)} layers to adapt")
    return names


def reaches_the_unet(name: str, text_encoder: nn.Module, spec: TextEncoderSpec) -> bool:
    """Whether the text encoder's module `name` can change what the UNet is conditioned on: not when it sits in a
    transformer layer after the hidden layer `spec` reads, unless its pooled output (from the last layer) is read."""
    found = _ENCODER_LAYER.search(name)
    if spec.pooled or spec.hidden_layer == -1 or found is None:
        return True
    # hidden_states[0] is the embeddings, so hidden layer h (negative) is the output of layer `layers + h`
    return int(found[1]) <= text_encoder.config.num_hidden_layers + spec.hidden_layer
