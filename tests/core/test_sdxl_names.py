"""SDXL's real architecture (on the meta device, no memory): every adaptable module through both writers and back,
kohya's LDM names against diffusers' own SGM <-> diffusers mapping, and the preset module counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlora.core import formats
from sdlora.core.families import SDXL
from sdlora.core.formats.ldm import LDM_SDXL
from sdlora.core.formats.single_file import single_file_slot
from sdlora.core.state import LoraModule, LoraState
from sdlora.training.network import unet_target_modules

SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_meta():
    """The real SDXL UNet, CLIP-L (12 layers, 768) and OpenCLIP-bigG (32 layers, 1280, projection 1280) on meta."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)
        )
    return {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}


def _every_adaptable_module(models: dict[str, nn.Module]) -> LoraState:
    """A rank-1 LoRA on every Linear and Conv2d of the three models, each with its own values (alpha != rank)."""
    modules = {}
    for component, model in models.items():
        for index, (name, layer) in enumerate(model.named_modules()):
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            path = name if component == "unet" or name.startswith(("text_model.", "text_projection")) else "text_model." + name
            if isinstance(layer, nn.Linear):
                down, up = torch.full((1, layer.in_features), float(index)), torch.full((layer.out_features, 1), 0.5)
            else:
                down, up = (
                    torch.full((1, layer.in_channels, *layer.kernel_size), float(index)),
                    torch.full((layer.out_channels, 1, 1, 1), 0.5),
                )
            modules[f"{component}.{path}"] = LoraModule(down, up, alpha=3.0)
    return LoraState(modules)


def _assert_same(read: LoraState, written: LoraState) -> None:
    assert read.modules.keys() == written.modules.keys()
    for path, module in written.modules.items():
        other = read.modules[path]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up) and other.effective_alpha == 3.0, path


def test_every_adaptable_module_survives_both_writers(sdxl_meta):
    state = _every_adaptable_module(sdxl_meta)
    counts = {c: len(state.for_component(c)) for c in state.components()}
    assert counts == {"unet": 794, "text_encoder": 72, "text_encoder_2": 193}
    kohya = formats.to_kohya(state, SDXL)
    assert formats.detect_format(kohya) == formats.KOHYA_LDM  # kohya's SDXL names: LDM blocks
    _assert_same(formats.to_lora_state(kohya), state)
    tensors, header = formats.to_diffusers(state)
    _assert_same(formats.to_lora_state(tensors, header), state)


def test_kohya_ldm_names_are_what_diffusers_reads_sgm_blocks_from(sdxl_meta):
    """diffusers' own conversion of kohya SDXL files (SGM blocks -> diffusers blocks -> its older LoRA layout), read
    back by sdlora, gives every UNet module of ours under the same path with the same tensors."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers

    unet_only = _every_adaptable_module({"unet": sdxl_meta["unet"]})
    kohya = formats.to_kohya(unet_only, SDXL)
    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(dict(kohya), sdxl_meta["unet"].config))
    read = formats.to_lora_state(converted, fmt=formats.DIFFUSERS_OLD)
    assert read.modules.keys() == unet_only.modules.keys()
    assert all(torch.equal(read.modules[p].down, m.down) and torch.equal(read.modules[p].up, m.up) for p, m in unet_only.modules.items())


def test_single_file_unet_names_are_what_diffusers_converts_from(sdxl_meta):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = sdxl_meta["unet"]
    names = list(unet.state_dict())
    checkpoint = {single_file_slot("unet", name, LDM_SDXL, None, {}).key: torch.empty(0) for name in names}
    assert len(checkpoint) == len(names)  # one single-file key per weight, none shared
    converted = convert_ldm_unet_checkpoint(checkpoint, unet.config)
    assert set(converted) == set(names)


def test_preset_module_counts_on_the_real_sdxl_unet(sdxl_meta):
    unet = sdxl_meta["unet"]
    counts = {preset: len(unet_target_modules(unet, preset)) for preset in ("attn", "attn-ff", "all")}
    # 70 transformer blocks x 8 attention projections; + 2 feed-forward layers each and 11 proj_in/proj_out pairs
    # (kohya's default SDXL LoRA: 722 UNet modules); `all` adds every resnet and sampler conv
    assert counts == {"attn": 560, "attn-ff": 722, "all": 788}
