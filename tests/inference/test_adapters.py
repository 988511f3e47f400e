"""Loading LoRAs into the tiny pipeline: formats agree, weights and alphas are honoured, mismatches are loud."""

from __future__ import annotations

import pytest
import torch

from sdlora.core.files import write_diffusers, write_kohya
from sdlora.core.state import LoraModule, LoraState
from sdlora.inference.adapters import (
    LoraMatchWarning,
    count_lora_layers,
    load_lora,
    loaded_loras,
    set_lora_scales,
    unload_loras,
)
from sdlora.models.tiny import build_tiny_pipeline


def _latents(pipe, prompt: str = "a photo of a cat") -> torch.Tensor:
    """2-step, 64 px generation, stopped before the VAE (the most sensitive output to compare)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent").images


def _scalings(model, adapter: str) -> dict[str, float]:
    from peft.tuners.lora import LoraLayer

    return {name: m.scaling[adapter] for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.scaling}


@pytest.fixture
def lora_files(tmp_path, tiny_pipe, random_lora_state):
    """The same rank-4, alpha-8 LoRA as a diffusers file and a kohya file."""
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0)
    return write_diffusers(state, tmp_path / "style.safetensors"), write_kohya(state, tmp_path / "style_kohya.safetensors")


def test_diffusers_and_kohya_files_change_the_output_identically(tiny_pipe, lora_files):
    diffusers_file, kohya_file = lora_files
    base = _latents(tiny_pipe)
    load_lora(tiny_pipe, diffusers_file)
    from_diffusers_file = _latents(tiny_pipe)
    unload_loras(tiny_pipe)
    torch.testing.assert_close(_latents(tiny_pipe), base, rtol=0, atol=0)
    load_lora(tiny_pipe, kohya_file)
    from_kohya_file = _latents(tiny_pipe)

    assert (from_diffusers_file - base).abs().max() > 1e-2
    torch.testing.assert_close(from_kohya_file, from_diffusers_file, rtol=1e-5, atol=1e-6)

    # reference: diffusers reading the same files itself (its kohya converter is right for uniform alpha)
    for path in lora_files:
        reference = build_tiny_pipeline()
        reference.load_lora_weights(str(path.parent), weight_name=path.name)
        torch.testing.assert_close(_latents(reference), from_diffusers_file, rtol=1e-5, atol=1e-6)


def test_scale_zero_gives_the_base_output(tiny_pipe, lora_files):
    base = _latents(tiny_pipe)
    name = load_lora(tiny_pipe, lora_files[0], scale=0.0)
    assert (_latents(tiny_pipe) - base).abs().max() <= 1e-6
    set_lora_scales(tiny_pipe, {name: 1.0})
    assert (_latents(tiny_pipe) - base).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # diffusers' reference path warns on a second adapter
def test_two_loras_with_weights_match_diffusers_set_adapters(tmp_path, tiny_pipe, random_lora_state):
    first = write_diffusers(random_lora_state(tiny_pipe, rank=4, alpha=8.0, seed=1), tmp_path / "first.safetensors")
    second = write_diffusers(random_lora_state(tiny_pipe, rank=4, alpha=3.0, seed=2), tmp_path / "second.safetensors")
    assert load_lora(tiny_pipe, first, scale=0.7) == "first"
    assert load_lora(tiny_pipe, second, scale=0.3) == "second"
    ours = _latents(tiny_pipe)
    # loading the second LoRA kept the first one's weight: peft scaling = weight * alpha / r
    assert {round(v, 6) for v in _scalings(tiny_pipe.unet, "first").values()} == {round(0.7 * 8 / 4, 6)}
    assert {round(v, 6) for v in _scalings(tiny_pipe.text_encoder, "second").values()} == {round(0.3 * 3 / 4, 6)}
    assert [(lora.name, lora.scale) for lora in loaded_loras(tiny_pipe)] == [("first", 0.7), ("second", 0.3)]

    reference = build_tiny_pipeline()
    reference.load_lora_weights(str(tmp_path), weight_name=first.name, adapter_name="a")
    reference.load_lora_weights(str(tmp_path), weight_name=second.name, adapter_name="b")
    reference.set_adapters(["a", "b"], [0.7, 0.3])
    torch.testing.assert_close(ours, _latents(reference), rtol=1e-5, atol=1e-6)

    set_lora_scales(tiny_pipe, {"second": 0.0})
    reference.set_adapters(["a", "b"], [0.7, 0.0])
    torch.testing.assert_close(_latents(tiny_pipe), _latents(reference), rtol=1e-5, atol=1e-6)


def test_per_module_alpha_is_honoured(tmp_path, tiny_pipe, random_lora_state):
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0)
    odd_unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    odd_text = "text_encoder.text_model.encoder.layers.2.self_attn.k_proj"
    state.modules[odd_unet].alpha = 2.0
    state.modules[odd_text].alpha = 12.0
    name = load_lora(tiny_pipe, write_kohya(state, tmp_path / "mixed.safetensors"))

    unet_scalings = _scalings(tiny_pipe.unet, name)
    text_scalings = {k.removeprefix("text_model."): v for k, v in _scalings(tiny_pipe.text_encoder, name).items()}
    assert unet_scalings.pop(odd_unet.removeprefix("unet.")) == pytest.approx(0.5)
    assert text_scalings.pop("encoder.layers.2.self_attn.k_proj") == pytest.approx(3.0)
    assert {round(v, 6) for v in [*unet_scalings.values(), *text_scalings.values()]} == {2.0}

    torch.testing.assert_close(_latents(tiny_pipe), _latents(_merged_by_hand(state)), rtol=1e-4, atol=1e-5)


def _merged_by_hand(state: LoraState):
    """Independent expectation: W + (alpha / r) * up @ down written into a fresh pipeline's weights."""
    merged = build_tiny_pipeline()
    for path, module in state.modules.items():
        component, module_path = path.split(".", 1)
        names = dict(getattr(merged, component).named_modules())
        layer = names.get(module_path) or names[module_path.removeprefix("text_model.")]
        layer.weight.data += module.delta()
    return merged


def test_conv_3x3_lora_matches_a_hand_merge(tmp_path, tiny_pipe, random_lora_state):
    state = random_lora_state(tiny_pipe, rank=4, alpha=3.0, unet_targets=("conv1", "conv2", "time_emb_proj"), text_encoder=False)
    assert any(m.is_conv and m.down.shape[-1] == 3 for m in state.modules.values())
    base = _latents(tiny_pipe)
    load_lora(tiny_pipe, write_kohya(state, tmp_path / "locon.safetensors"))
    assert count_lora_layers(tiny_pipe, "locon") == len(state)
    loaded = _latents(tiny_pipe)
    assert (loaded - base).abs().max() > 1e-2
    # a 3x3 LoRA runs as two convolutions, the merge as one: fp32 rounding differs slightly more than for Linear
    torch.testing.assert_close(loaded, _latents(_merged_by_hand(state)), rtol=1e-4, atol=1e-4)


def test_lora_matching_no_module_is_an_error(tiny_pipe):
    state = LoraState({"unet.not_a_block.0.to_q": LoraModule(torch.ones(4, 32), torch.ones(32, 4), 8.0)})
    with pytest.raises(ValueError, match=r"matches none of the model's \d+ adaptable modules"):
        load_lora(tiny_pipe, state)
    assert tiny_pipe.get_list_adapters() == {}


def test_sdxl_shaped_lora_into_sd1_model_is_a_clear_error(tiny_pipe, random_lora_state):
    # the tiny model's own attention paths, but cross-attention reads SDXL's 2048-wide text features
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, text_encoder=False)
    for path in [p for p in state.modules if p.endswith(("attn2.to_k", "attn2.to_v"))]:
        out_features = state.modules[path].up.shape[0]
        state.modules[path] = LoraModule(torch.randn(4, 2048), torch.randn(out_features, 4), 8.0)
    with pytest.raises(
        ValueError,
        match=r"makes a \[\d+, 2048\] update but weight .* is \[\d+, 32\]: the LoRA was made for SDXL \(cross-attention width 2048\)",
    ) as error:
        load_lora(tiny_pipe, state)
    assert "\n" not in str(error.value)
    assert tiny_pipe.get_list_adapters() == {}

    second_encoder_only = LoraState(
        {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": LoraModule(torch.ones(4, 1280), torch.ones(1280, 4), 8.0)}
    )
    with pytest.raises(ValueError, match="text_encoder_2.*made for SDXL"):
        load_lora(tiny_pipe, second_encoder_only)


def test_partial_match_warns_with_the_count_and_loads_the_rest(tiny_pipe, random_lora_state):
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, text_encoder=False)
    total = len(state)
    state.modules["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"] = LoraModule(torch.ones(4, 32), torch.ones(32, 4), 8.0)
    state.modules["unet.up_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"] = LoraModule(torch.ones(4, 32), torch.ones(32, 4), 8.0)
    with pytest.warns(
        LoraMatchWarning, match=rf"only {total} of its {total + 2} modules match this model; 2 are skipped \(e\.g\. unet\.down_blocks\.9"
    ):
        name = load_lora(tiny_pipe, state)
    assert count_lora_layers(tiny_pipe, name) == total


def test_text_encoder_only_lora_changes_the_output(tiny_pipe, random_lora_state):
    base = _latents(tiny_pipe)
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, unet_targets=())
    assert state.components() == ["text_encoder"]
    name = load_lora(tiny_pipe, state, adapter_name="words")
    assert name == "words"
    assert tiny_pipe.get_list_adapters() == {"text_encoder": ["words"]}
    assert count_lora_layers(tiny_pipe, name) == len(state) == 20
    assert (_latents(tiny_pipe) - base).abs().max() > 1e-3


def test_flat_lora_fits_a_1x1_conv_layer(tiny_pipe, random_lora_state):
    conv_state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, unet_targets=("proj_in", "proj_out"), text_encoder=False)
    assert all(m.is_conv for m in conv_state.modules.values())
    flat_state = LoraState({p: LoraModule(m.down.flatten(1), m.up.flatten(1), m.alpha) for p, m in conv_state.modules.items()})
    load_lora(tiny_pipe, conv_state)
    from_conv = _latents(tiny_pipe)
    unload_loras(tiny_pipe)
    load_lora(tiny_pipe, flat_state)
    torch.testing.assert_close(_latents(tiny_pipe), from_conv, rtol=0, atol=0)


def test_default_adapter_names_are_unique(tiny_pipe, lora_files):
    assert load_lora(tiny_pipe, lora_files[0]) == "style"
    assert load_lora(tiny_pipe, lora_files[0]) == "style_2"
    with pytest.raises(ValueError, match="'style' is already loaded"):
        load_lora(tiny_pipe, lora_files[0], adapter_name="style")
    with pytest.raises(ValueError, match="'half' must hold only letters"):
        load_lora(tiny_pipe, lora_files[0], adapter_name="half")
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):
        set_lora_scales(tiny_pipe, {"nope": 1.0})


def test_layers_dropped_by_diffusers_are_an_error(tiny_pipe, lora_files, monkeypatch):
    # stands in for diffusers skipping keys it cannot map: the text-encoder half never arrives
    monkeypatch.setattr(tiny_pipe, "load_lora_into_text_encoder", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match=r"created LoRA layers for only \d+ of the \d+ matched modules"):
        load_lora(tiny_pipe, lora_files[0])
    assert tiny_pipe.get_list_adapters() == {}, tiny_pipe.get_list_adapters()


def test_missing_and_pickle_files_are_refused(tmp_path, tiny_pipe):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_lora(tiny_pipe, tmp_path / "nothing.safetensors")
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1)}, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="pickle"):
        load_lora(tiny_pipe, tmp_path / "old.ckpt")
    assert tiny_pipe.get_list_adapters() == {}
