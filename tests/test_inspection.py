"""inspection.py (`sdlora inspect`): format, rank, alpha and base architecture of a file in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlora import formats
from sdlora.inspection import describe, format_description, guess_architecture, to_json
from sdlora.lorafile import read_lora, write_kohya
from sdlora.state import LoraModule, LoraState

RANK, ALPHA = 4, 8.0
CROSS_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # input width = text-embedding width
SELF_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
# per format, the documented name of each module (kohya LDM: SD1/SDXL input block 4 = down_blocks.1 attention 0)
_LDM = {CROSS_K: "input_blocks_4_1_transformer_blocks_0_attn2_to_k", SELF_Q: "input_blocks_4_1_transformer_blocks_0_attn1_to_q"}
_ATTN_PROCS = {CROSS_K: "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
               SELF_Q: "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
               TE_Q: "text_model.encoder.layers.0.self_attn.to_q_lora"}  # fmt: skip
# the alpha each format implies: stored (kohya .alpha, diffusers/peft lora_alpha) or none (= rank, scale 1)
EXPECTED_ALPHA = {formats.DIFFUSERS: ALPHA, formats.KOHYA: ALPHA, formats.KOHYA_LDM: ALPHA, formats.DIFFUSERS_OLD: RANK, formats.ATTN_PROCS: RANK, formats.PEFT: ALPHA}


def write_format_file(folder: Path, fmt: str, cross_width: int = 768, text_width: int | None = 768, text2_width: int | None = None) -> Path:
    """A small LoRA file in `fmt` with keys spelled as the format documents them (not written by sdlora)."""
    generator = torch.Generator().manual_seed(0)

    def pair(width_in: int, width_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(RANK, width_in, generator=generator), torch.randn(width_out, RANK, generator=generator)

    unet = {CROSS_K: pair(cross_width, 640), SELF_Q: pair(640, 640)}
    te = {TE_Q: pair(text_width, text_width)} if text_width and fmt != formats.PEFT else {}
    te2 = {TE_Q: pair(text2_width, text2_width)} if text2_width else {}
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}

    def put(name: str, down_suffix: str, up_suffix: str, lora: tuple[torch.Tensor, torch.Tensor], alpha_key: str | None = None) -> None:
        tensors[name + down_suffix], tensors[name + up_suffix] = lora
        if alpha_key:
            tensors[name + alpha_key] = torch.tensor(ALPHA)

    underscored = "_".join
    if fmt == formats.DIFFUSERS:
        for prefix, modules in (("unet", unet), ("text_encoder", te)):
            for path, lora in modules.items():
                put(f"{prefix}.{path}", ".lora_A.weight", ".lora_B.weight", lora)
        header = {"unet.r": RANK, "unet.lora_alpha": ALPHA, "text_encoder.r": RANK, "text_encoder.lora_alpha": ALPHA}
        metadata = {"format": "pt", formats.METADATA_KEY: json.dumps(header)}
    elif fmt in (formats.KOHYA, formats.KOHYA_LDM):
        te_prefix = "lora_te1_" if te2 else "lora_te_"
        for path, lora in unet.items():
            name = _LDM[path] if fmt == formats.KOHYA_LDM else underscored(path.split("."))
            put("lora_unet_" + name, ".lora_down.weight", ".lora_up.weight", lora, ".alpha")
        for prefix, modules in ((te_prefix, te), ("lora_te2_", te2)):
            for path, lora in modules.items():
                put(prefix + underscored(path.split(".")), ".lora_down.weight", ".lora_up.weight", lora, ".alpha")
        metadata = {"ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}
    elif fmt == formats.DIFFUSERS_OLD:
        for path, lora in unet.items():
            put(f"unet.{path}", ".lora.down.weight", ".lora.up.weight", lora)
        for path, lora in te.items():
            put(f"text_encoder.{path}", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", lora)
    elif fmt == formats.ATTN_PROCS:
        for prefix, modules in (("unet", unet), ("text_encoder", te)):
            for path, lora in modules.items():
                put(f"{prefix}.{_ATTN_PROCS[path]}", ".down.weight", ".up.weight", lora)
    elif fmt == formats.PEFT:
        for path, lora in unet.items():
            put(f"base_model.model.{path}", ".lora_A.weight", ".lora_B.weight", lora)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(unet)}))
    path = folder / ("adapter_model.safetensors" if fmt == formats.PEFT else f"{fmt}.safetensors")
    save_file(tensors, str(path), metadata=metadata or None)
    return path


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize(("cross_width", "architecture"), [(768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL")])
def test_describe_each_format(tmp_path, fmt, cross_width, architecture):
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
def test_describe_sdxl_kohya_with_two_text_encoders(tmp_path, fmt):
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
        (_state(unet__mid_block__attentions__0__transformer_blocks__0__attn2__to_k=(1024, 1280), text_encoder__text_model__encoder__layers__0__mlp__fc1=(768, 3072)), "SD2.x"),
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
