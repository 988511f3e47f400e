"""SD3.5 Medium's real transformer (on the meta device, no memory): every Linear and Conv2d through both writers and
back, exact, the fused qkv on every block; the kohya names against the SAI checkpoint keys diffusers converts from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlora.core import formats
from sdlora.core.families import SD3
from sdlora.core.state import LoraModule, LoraState

# SD3.5 Medium's transformer config (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip


@pytest.fixture(scope="module")
def sd35_medium_lora() -> LoraState:
    """A rank-1 LoRA (alpha 3) with its own values on every Linear and Conv2d of SD3.5 Medium's transformer."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM)
    modules = {}
    for index, (name, layer) in enumerate(transformer.named_modules()):
        if isinstance(layer, nn.Linear):
            down, up = torch.full((1, layer.in_features), float(index)), torch.full((layer.out_features, 1), 0.5)
        elif isinstance(layer, nn.Conv2d):
            down, up = torch.full((1, layer.in_channels, *layer.kernel_size), float(index)), torch.full((layer.out_channels, 1, 1, 1), 0.5)
        else:
            continue
        modules[f"transformer.{name}"] = LoraModule(down, up, alpha=3.0)
    return LoraState(modules)


def test_every_layer_of_sd35_medium_survives_both_writers(sd35_medium_lora):
    state = sd35_medium_lora
    # 24 blocks of 14 layers (q/k/v and out of each stream, two MLP layers of each, two norms), less the last block's
    # context out and MLP (3); attn2's q/k/v/out on blocks 0-12; 8 outside the blocks
    assert len(state) == 24 * 14 - 3 + 13 * 4 + 8 == 393
    kohya = formats.to_kohya(state, SD3)
    names = {key.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for key in kohya}
    assert len(names) == len(state) - 2 * (24 * 2 + 13)  # every q/k/v triple fused: x and context streams, attn2
    assert sum(name.endswith("_qkv") for name in names) == 24 * 2 + 13
    back = formats.to_lora_state(kohya)
    assert back.modules.keys() == state.modules.keys()
    for path, module in state.modules.items():
        read = back.modules[path]
        assert torch.equal(read.down, module.down) and torch.equal(read.up, module.up) and read.effective_alpha == 3.0, path
    tensors, header = formats.to_diffusers(state)
    assert formats.to_lora_state(tensors, header).modules.keys() == state.modules.keys()


def test_kohya_names_are_the_sai_checkpoint_keys(sd35_medium_lora):
    """Every kohya module name is `lora_unet_` + an SAI MMDiT weight key underscored, as ComfyUI maps them, and the
    SAI keys are those diffusers' converter reads for a transformer of these layers."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    kohya = formats.to_kohya(sd35_medium_lora, SD3)
    sai = {}
    for key in kohya:
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            path = formats.names.split_kohya_name(name.removeprefix("lora_unet_"), key)
            assert "lora_unet_" + path.replace(".", "_") == name
            sai[path + ".weight"] = sai[path + ".bias"] = torch.empty(0)
    sai["pos_embed"] = torch.empty(0)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    weights = {key.removesuffix(".weight") for key in converted if key.endswith(".weight")}
    assert weights == {path.removeprefix("transformer.") for path in sd35_medium_lora.modules}
