"""inspection.py (`sdlora inspect`): format, rank, alpha and base architecture of a file in every format."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora.core import formats
from sdlora.core.files import read_lora, write_kohya
from sdlora.core.inspection import describe, format_description, guess_architecture, to_json
from sdlora.core.state import LoraModule, LoraState


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize(("cross_width", "architecture"), [(768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL")])
def test_describe_each_format(tmp_path, fmt, cross_width, architecture, write_format_file, format_rank_alpha):
    RANK, EXPECTED_ALPHA = format_rank_alpha
    text_width = {"SD1.x": 768, "SD2.x": 1024, "SDXL": 768}[architecture]
    path = write_format_file(tmp_path, fmt, cross_width, text_width)
    info = describe(read_lora(path), path)
    assert info["format"] == fmt
    assert info["architecture"] == architecture
    assert (info["rank"], info["ranks"]) == (RANK, [RANK])
    assert info["alpha"] == EXPECTED_ALPHA[fmt] and info["scale"] == EXPECTED_ALPHA[fmt] / RANK
    unet_modules = 2
    assert info["components"] == ({"unet": unet_modules} if fmt == formats.PEFT else {"unet": unet_modules, "text_encoder": 1})
    assert info["size_bytes"] == path.stat().st_size and info["dtype"] == "float32"
    assert info["parameters"] == sum(m.down.numel() + m.up.numel() for m in read_lora(path).modules.values())
    assert "sdlora_format" not in info["metadata"]
    text = format_description(info)
    assert f"format:        {fmt}\n" in text and f"architecture:  {architecture}\n" in text
    assert f"rank:          {RANK}\n" in text and f"alpha:         {EXPECTED_ALPHA[fmt]:g}\n" in text
    assert json.loads(to_json(info))["architecture"] == architecture


@pytest.mark.parametrize("fmt", [formats.KOHYA, formats.KOHYA_LDM])
def test_describe_sdxl_kohya_with_two_text_encoders(tmp_path, fmt, write_format_file):
    path = write_format_file(tmp_path, fmt, cross_width=2048, text_width=768, text2_width=1280)
    info = describe(read_lora(path), path)
    assert info["architecture"] == "SDXL"
    assert info["components"] == {"unet": 2, "text_encoder": 1, "text_encoder_2": 1}


def _state(**modules: tuple[int, int]) -> LoraState:
    """LoraState from {path with __ for dots: (in, out)} (rank 4, alpha 8)."""
    return LoraState({p.replace("__", "."): LoraModule(torch.zeros(4, i), torch.zeros(o, 4), 8.0) for p, (i, o) in modules.items()})


@pytest.mark.parametrize(
    ("state", "architecture"),
    [
        (_state(text_encoder__text_model__encoder__layers__0__self_attn__k_proj=(768, 768)), "SD1.x"),
        (_state(text_encoder__text_model__encoder__layers__0__self_attn__k_proj=(1024, 1024)), "SD2.x"),
        (_state(text_encoder_2__text_model__encoder__layers__0__self_attn__k_proj=(1280, 1280)), "SDXL"),
        (_state(unet__up_blocks__0__attentions__0__transformer_blocks__1__attn1__to_q=(1280, 1280)), "SDXL"),
        (_state(unet__mid_block__attentions__0__transformer_blocks__0__attn2__to_v=(32, 64)), "unknown (cross-attention width 32)"),
        (_state(unet__mid_block__attentions__0__proj_in=(64, 64)), "unknown (no cross-attention or text-encoder module to measure)"),
        # the UNet's cross-attention width decides over a text encoder's
        (
            _state(
                unet__mid_block__attentions__0__transformer_blocks__0__attn2__to_k=(1024, 1280),
                text_encoder__text_model__encoder__layers__0__mlp__fc1=(768, 3072),
            ),
            "SD2.x",
        ),
    ],
    ids=["te-768", "te-1024", "te2", "two-transformer-blocks", "tiny", "nothing-to-measure", "unet-decides"],
)
def test_guess_architecture(state, architecture):
    assert guess_architecture(state) == architecture


def test_describe_mixed_ranks_alphas_and_layer_kinds(tmp_path):
    state = LoraState(
        {
            "unet.a.to_q": LoraModule(torch.zeros(4, 8), torch.zeros(8, 4), 8.0),
            "unet.a.to_k": LoraModule(torch.zeros(4, 8), torch.zeros(8, 4), 8.0),
            "unet.a.proj_in": LoraModule(torch.zeros(2, 8, 1, 1), torch.zeros(8, 2, 1, 1), 1.0),
            "unet.b.conv1": LoraModule(torch.zeros(4, 8, 3, 3), torch.zeros(8, 4, 1, 1), None),
        },
        {"ss_tag_frequency": "x" * 300, "multi": "line one\nline two"},
    )
    info = describe(state)
    assert (info["rank"], info["ranks"], info["alpha"], info["alphas"]) == (4, [2, 4], 8.0, [1.0, 4.0, 8.0])
    assert info["layer_kinds"] == {"linear": 2, "conv1x1": 1, "conv3x3": 1}
    assert info["file"] is None and info["size_bytes"] is None
    text = format_description(info)
    assert "rank:          4 (all: 2, 4)" in text and "alpha:         8 (all: 1, 4, 8)" in text
    assert "  ss_tag_frequency: " + "x" * 97 + "..." in text and "  multi: line one line two" in text
    assert "size:" not in text


def test_describe_our_kohya_file_shows_its_ss_metadata(tmp_path):
    state = _state(unet__mid_block__attentions__0__transformer_blocks__0__attn2__to_k=(768, 1280))
    path = write_kohya(state, tmp_path / "x.safetensors")
    info = describe(read_lora(path), path)
    assert info["metadata"]["ss_network_dim"] == "4" and info["metadata"]["ss_base_model_version"] == "sd_v1"
    assert info["architecture"] == "SD1.x" and info["alpha"] == 8.0


def test_describe_names_the_family_kohya_metadata_gives_where_the_shapes_fit_no_released_model():
    """The README's demo LoRA: the demo model's widths are no released model's, its kohya header says SD1."""
    tiny = _state(unet__mid_block__attentions__0__transformer_blocks__0__attn2__to_v=(32, 64))
    assert describe(tiny)["architecture"] == "unknown (cross-attention width 32)"  # no header: the shapes alone
    labelled = LoraState(tiny.modules, {"ss_base_model_version": "sd_v1"})
    assert describe(labelled)["architecture"] == "SD1.x by its metadata (cross-attention width 32: no released model's)"
    released = _state(text_encoder__text_model__encoder__layers__0__self_attn__k_proj=(1024, 1024))
    assert describe(LoraState(released.modules, {"ss_base_model_version": "sd_v1"}))["architecture"] == "SD2.x"  # shapes first
