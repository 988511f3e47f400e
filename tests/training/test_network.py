"""Tests for sdlora/lora.py: presets on the tiny UNet, peft injection under bf16, extraction and file round trips."""

from __future__ import annotations

import pytest
import torch

from sdlora.core import targets
from sdlora.core.files import write_diffusers, write_kohya
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training import network

RANK, ALPHA = 4, 8.0
# the tiny UNet has 6 transformer blocks (down 2, mid 1, up 3), 12 resnets (7 with a conv_shortcut), 2 resamplers
TRANSFORMER_BLOCKS = 6
ATTENTION_NAME = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # small latents and few tokens keep each forward pass well under a second on a CPU
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    embeddings = torch.randn(2, 8, 32, generator=generator)
    return sample, torch.tensor([10, 700]), embeddings


def _token_ids(pipe) -> torch.Tensor:
    return pipe.tokenizer(["a photo of a cat", "red sky"], padding="max_length", max_length=77, return_tensors="pt").input_ids


@torch.no_grad()
def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    sample, timesteps, embeddings = _unet_inputs()
    return pipe.unet(sample, timesteps, embeddings).sample, pipe.text_encoder(_token_ids(pipe))[0]


@torch.no_grad()
def _randomize(params: list[torch.nn.Parameter], seed: int = 3) -> None:
    """Non-zero A and B, so the LoRA changes the outputs (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _trained(pipe, preset: str, alpha: float = ALPHA, text_encoder: bool = True):
    params = network.add_lora(pipe.unet, targets.unet_target_modules(pipe.unet, preset), RANK, alpha)
    if text_encoder:
        params += network.add_lora(pipe.text_encoder, targets.text_encoder_target_modules(pipe.text_encoder), RANK, alpha)
    _randomize(params)
    return pipe


def _peft_layer_count(model: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


# ---------------------------------------------------------------- presets


def test_presets_select_exactly_the_expected_layers(tiny_pipe):
    attn = targets.unet_target_modules(tiny_pipe.unet, "attn")
    attn_ff = targets.unet_target_modules(tiny_pipe.unet, "attn-ff")
    everything = targets.unet_target_modules(tiny_pipe.unet, "all")
    assert len(attn) == TRANSFORMER_BLOCKS * 8  # attn1 + attn2, q/k/v/out each
    assert len(attn_ff) == TRANSFORMER_BLOCKS * (8 + 2 + 2)  # + ff.net.0.proj, ff.net.2, proj_in, proj_out
    # + resnets: 12 x (conv1, conv2, time_emb_proj) + 7 conv_shortcut; + 1 downsampler and 1 upsampler conv
    assert len(everything) == len(attn_ff) + 12 * 3 + 7 + 2
    assert ATTENTION_NAME in attn and "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in attn
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in attn)
    assert {"up_blocks.0.attentions.2.proj_out", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"} <= set(attn_ff) - set(
        attn
    )
    assert set(attn) < set(attn_ff) < set(everything)
    layers = dict(tiny_pipe.unet.named_modules())
    assert layers["down_blocks.0.resnets.0.conv1"].kernel_size == (3, 3) and "down_blocks.0.resnets.0.conv1" in everything
    assert {
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1.resnets.2.conv_shortcut",
        "mid_block.resnets.1.time_emb_proj",
    } <= set(everything)
    assert not {"conv_in", "conv_out", "time_embedding.linear_1"} & set(everything)


def test_presets_see_through_existing_lora_layers(tiny_pipe):
    before = targets.unet_target_modules(tiny_pipe.unet, "all")
    network.add_lora(tiny_pipe.unet, targets.unet_target_modules(tiny_pipe.unet, "attn"), RANK, ALPHA)
    assert targets.unet_target_modules(tiny_pipe.unet, "all") == before  # no base_layer / lora_A names


def test_unknown_preset_names_the_choices(tiny_pipe):
    with pytest.raises(ValueError, match="'attention'.*attn, attn-ff, all"):
        targets.unet_target_modules(tiny_pipe.unet, "attention")


def test_text_encoder_targets_are_the_attention_projections(tiny_pipe):
    names = targets.text_encoder_target_modules(tiny_pipe.text_encoder)
    layers = tiny_pipe.text_encoder.config.num_hidden_layers
    assert len(names) == layers * len(targets.TEXT_ENCODER_TARGETS)
    assert {name.rpartition(".")[2] for name in names} == set(targets.TEXT_ENCODER_TARGETS)
    assert all(".self_attn." in name for name in names)


# ---------------------------------------------------------------- injection


def test_only_lora_parameters_train_and_they_stay_fp32_on_a_bf16_model(tiny_pipe):
    unet = tiny_pipe.unet.to(torch.bfloat16)
    sample, timesteps, embeddings = _unet_inputs()
    with torch.no_grad():
        base = unet(sample.bfloat16(), timesteps, embeddings.bfloat16()).sample
    params = network.add_lora(unet, targets.unet_target_modules(unet, "all"), RANK, ALPHA)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(params) == 2 * 117 and {id(p) for p in trainable} == {id(p) for p in params}
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {id(p) for p in network.lora_parameters(unet)} == {id(p) for p in params}
    with torch.no_grad():
        adapted = unet(sample.bfloat16(), timesteps, embeddings.bfloat16()).sample
    assert adapted.dtype == torch.bfloat16
    assert torch.equal(adapted, base)  # B starts at zero: the model is unchanged until trained


@pytest.mark.parametrize("init", ["gaussian", "default"])
def test_init_from_a_generator_is_reproducible(init):
    def lora_a(seed: int) -> list[torch.Tensor]:
        pipe = build_tiny_pipeline()
        network.add_lora(
            pipe.unet, targets.unet_target_modules(pipe.unet, "attn"), RANK, ALPHA, init=init, generator=torch.Generator().manual_seed(seed)
        )
        layers = network._lora_layers(pipe.unet, "default").values()
        assert all(not layer.lora_B["default"].weight.any() for layer in layers)
        return [layer.lora_A["default"].weight.detach().clone() for layer in layers]

    torch.manual_seed(123)  # the global RNG must not matter
    first = lora_a(5)
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(first, lora_a(5)))
    assert not torch.equal(first[0], lora_a(6)[0])
    if init == "gaussian":  # peft's gaussian init: std 1 / r
        assert torch.cat([a.flatten() for a in first]).std().item() == pytest.approx(1 / RANK, rel=0.05)


def test_bad_lora_options_are_value_errors(tiny_pipe):
    layers = targets.unet_target_modules(tiny_pipe.unet, "attn")
    with pytest.raises(ValueError, match="rank"):
        network.add_lora(tiny_pipe.unet, layers, 0, ALPHA)
    with pytest.raises(ValueError, match="init"):
        network.add_lora(tiny_pipe.unet, layers, RANK, ALPHA, init="pissa")
    with pytest.raises(ValueError, match="no LoRA adapter named 'default'"):
        network.extract_lora_state({"unet": tiny_pipe.unet})


# ---------------------------------------------------------------- extraction


def test_extract_reads_alpha_shapes_and_text_model_paths(tiny_pipe):
    pipe = _trained(tiny_pipe, "all", alpha=3.0)
    state = network.extract_lora_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert len(state) == 117 + 20
    assert state.alphas() == [3.0] and state.ranks() == [RANK]  # the configured alpha, not the rank
    te_paths = [p for p in state.modules if p.startswith("text_encoder.")]
    assert len(te_paths) == 20 and all(p.startswith("text_encoder.text_model.encoder.layers.") for p in te_paths)
    conv = state.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (RANK, 32, 3, 3) and conv.up.shape == (32, RANK, 1, 1)
    linear = state.modules[f"unet.{ATTENTION_NAME}"]
    layer = dict(pipe.unet.named_modules())[ATTENTION_NAME]
    assert torch.equal(linear.up, layer.lora_B["default"].weight.detach())
    assert all(m.down.dtype == torch.float32 and m.down.device.type == "cpu" and not m.down.requires_grad for m in state.modules.values())
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(1.0)
    assert not torch.equal(linear.up, layer.lora_B["default"].weight.detach())  # a copy, not a view


def test_extract_from_bf16_base_gives_fp32(tiny_pipe):
    tiny_pipe.unet.to(torch.bfloat16)
    network.add_lora(tiny_pipe.unet, targets.unet_target_modules(tiny_pipe.unet, "attn"), RANK, ALPHA)
    state = network.extract_lora_state({"unet": tiny_pipe.unet})
    assert state.dtype() == torch.float32 and state.components() == ["unet"]


# ---------------------------------------------------------------- round trips through our writers and diffusers


def _round_trip(pipe, state, writer, path) -> None:
    trained_unet, trained_te = _outputs(pipe)
    writer(state, path)
    fresh = build_tiny_pipeline()  # same seed: the same base weights
    base_unet, base_te = _outputs(fresh)
    assert not torch.allclose(base_unet, trained_unet, atol=1e-4)  # the LoRA does change the outputs
    fresh.load_lora_weights(str(path))
    # diffusers skips keys it cannot map without a word: every module must have become a peft layer
    assert _peft_layer_count(fresh.unet) == len(state.for_component("unet"))
    assert _peft_layer_count(fresh.text_encoder) == len(state.for_component("text_encoder"))
    loaded_unet, loaded_te = _outputs(fresh)
    torch.testing.assert_close(loaded_unet, trained_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded_te, trained_te, rtol=1e-5, atol=1e-6)
    if state.for_component("text_encoder"):
        assert not torch.allclose(base_te, trained_te, atol=1e-4)


@pytest.mark.parametrize("writer", [write_diffusers, write_kohya], ids=["diffusers", "kohya"])
def test_round_trip_attention_and_text_encoder(tiny_pipe, tmp_path, writer):
    pipe = _trained(tiny_pipe, "attn")
    _round_trip(
        pipe, network.extract_lora_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder}), writer, tmp_path / "lora.safetensors"
    )


@pytest.mark.parametrize("writer", [write_diffusers, write_kohya], ids=["diffusers", "kohya"])
def test_round_trip_all_preset_with_3x3_convs(tiny_pipe, tmp_path, writer):
    pipe = _trained(tiny_pipe, "all", alpha=3.0, text_encoder=False)
    state = network.extract_lora_state({"unet": pipe.unet})
    assert any(m.is_conv and m.down.shape[-1] == 3 for m in state.modules.values())
    _round_trip(pipe, state, writer, tmp_path / "lora.safetensors")
