"""lorafile.py: the two writers (diffusers through save_lora_weights, kohya with real alphas and ss_* metadata),
round trips between them, diffusers' own loader as the reference, conv shapes, pickle safety, atomic writes."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.core import formats, matching
from sdlora.core.families import SD1
from sdlora.core.files import FORMAT_METADATA_KEY, kohya_metadata, read_lora, read_tensors, write_diffusers, write_kohya, write_lora
from sdlora.core.state import LoraModule, LoraState
from sdlora.models.tiny import build_tiny_pipeline

# linear attention projections, 1x1 conv (the tiny UNet's proj_in) and 3x3 conv (resnet conv1)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")


def _header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def assert_same_state(actual: LoraState, expected: LoraState) -> None:
    """Same modules, identical tensors and the same effective alpha."""
    assert sorted(actual.modules) == sorted(expected.modules)
    for path, want in expected.modules.items():
        got = actual.modules[path]
        assert got.down.dtype == want.down.dtype and torch.equal(got.down, want.down), path
        assert torch.equal(got.up, want.up), path
        assert got.effective_alpha == pytest.approx(want.effective_alpha, rel=1e-6), path


@pytest.fixture
def conv_lora(tiny_pipe, random_lora_state) -> LoraState:
    """Rank 4, alpha 3 on linear, 1x1-conv and 3x3-conv UNet modules and the text encoder."""
    state = random_lora_state(tiny_pipe, rank=4, alpha=3.0, unet_targets=UNET_TARGETS)
    assert {f"conv{m.down.shape[-1]}" if m.is_conv else "linear" for m in state.modules.values()} == {"linear", "conv1", "conv3"}
    return state


@pytest.fixture
def mixed_alpha_lora(tiny_pipe, random_lora_state) -> LoraState:
    """Modules with differing alpha and rank in the UNet and the text encoder."""
    state = random_lora_state(tiny_pipe, rank=4, alpha=8.0, unet_targets=UNET_TARGETS)
    state.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].alpha = 2.0
    state.modules["unet.mid_block.resnets.0.conv1"].alpha = 16.0  # a 3x3 conv
    state.modules["text_encoder.text_model.encoder.layers.1.self_attn.v_proj"].alpha = 5.0
    rank_two = "unet.up_blocks.0.attentions.2.proj_in"  # a 1x1 conv
    m = state.modules[rank_two]
    state.modules[rank_two] = LoraModule(m.down[:2].clone(), m.up[:, :2].clone(), 6.0)
    return state


# ---------------------------------------------------------------- round trips


def test_diffusers_to_kohya_to_diffusers_keeps_tensors_and_alpha(tmp_path, conv_lora):
    first = read_lora(write_diffusers(conv_lora, tmp_path / "a.safetensors"))
    kohya = read_lora(write_kohya(first, tmp_path / "b.safetensors"))
    second = read_lora(write_diffusers(kohya, tmp_path / "c.safetensors"))
    assert first.metadata[FORMAT_METADATA_KEY] == formats.DIFFUSERS and kohya.metadata[FORMAT_METADATA_KEY] == formats.KOHYA
    for state in (first, kohya, second):
        assert_same_state(state, conv_lora)
    # byte-for-byte the same tensors in both diffusers files
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(str(tmp_path / "c.safetensors"), "pt") as c:
        assert sorted(a.keys()) == sorted(c.keys())
        assert all(torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in a.keys())
    assert json.loads(_header(tmp_path / "a.safetensors")[formats.METADATA_KEY]) == json.loads(
        _header(tmp_path / "c.safetensors")[formats.METADATA_KEY]
    )


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_per_module_alpha_and_rank_survive_each_writer(tmp_path, mixed_alpha_lora, fmt):
    state = mixed_alpha_lora
    assert len(state.alphas()) == 5 and state.ranks() == [2, 4]
    assert_same_state(read_lora(write_lora(state, tmp_path / "x.safetensors", fmt)), state)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_half_precision_stays_half(tmp_path, tiny_pipe, fmt, random_lora_state):
    state = random_lora_state(tiny_pipe, unet_targets=UNET_TARGETS).to(torch.float16)
    back = read_lora(write_lora(state, tmp_path / "x.safetensors", fmt))
    assert back.dtype() == torch.float16
    assert_same_state(back, state)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_conv_lora_shapes_survive_each_writer(tmp_path, conv_lora, fmt):
    back = read_lora(write_lora(conv_lora, tmp_path / "x.safetensors", fmt))
    conv1 = next(p for p in back.modules if p.endswith("resnets.0.conv1"))
    proj_in = next(p for p in back.modules if p.endswith("attentions.0.proj_in"))
    assert back.modules[conv1].down.shape[1:] == (32, 3, 3) and back.modules[conv1].up.shape[2:] == (1, 1)
    assert back.modules[proj_in].down.shape[2:] == (1, 1) and back.modules[proj_in].up.shape[2:] == (1, 1)
    assert_same_state(back, conv_lora)


# ---------------------------------------------------------------- diffusers' own loader as the reference


def _outputs(pipe) -> torch.Tensor:
    """UNet noise prediction on fixed latents, conditioned on the (adapted) text encoder's output."""
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(latents, 10, pipe.text_encoder(ids)[0]).sample


def _lora_layers(pipe, adapter: str) -> dict[str, dict[str, float]]:
    """{component: {module name: peft scaling}} of every LoRA layer diffusers created."""
    from peft.tuners.lora import LoraLayer

    return {
        component: {
            n: m.scaling[adapter] for n, m in getattr(pipe, component).named_modules() if isinstance(m, LoraLayer) and adapter in m.scaling
        }
        for component in ("unet", "text_encoder")
    }


def _loaded(path) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    return _outputs(pipe), _lora_layers(pipe, "x")


def _expected_scalings(state: LoraState, pipe) -> dict[str, dict[str, float]]:
    expected: dict[str, dict[str, float]] = {"unet": {}, "text_encoder": {}}
    for component in expected:
        names = {n for n, _ in getattr(pipe, component).named_modules()}
        for path, module in state.for_component(component).items():
            expected[component][matching.resolve_module_path(path, names)] = module.scale
    return expected


def test_our_kohya_file_in_diffusers_loader_matches_our_diffusers_file(tmp_path, tiny_pipe, conv_lora):
    """Uniform alpha 3 != rank 4, text-encoder LoRA present, linear and conv modules."""
    diffusers_file = write_diffusers(conv_lora, tmp_path / "pytorch_lora_weights.safetensors")
    kohya_file = write_kohya(conv_lora, tmp_path / "style.safetensors")
    base = _outputs(tiny_pipe)
    from_diffusers, diffusers_layers = _loaded(diffusers_file)
    from_kohya, kohya_layers = _loaded(kohya_file)

    expected = _expected_scalings(conv_lora, tiny_pipe)
    assert len(expected["text_encoder"]) == 20 and len(expected["unet"]) > 40
    for layers in (diffusers_layers, kohya_layers):
        assert layers["text_encoder"] == pytest.approx(expected["text_encoder"])  # every TE layer created, scale 3/4
        assert layers["unet"] == pytest.approx(expected["unet"])
    assert set(kohya_layers["unet"].values()) == {0.75}
    assert (from_diffusers - base).abs().max() > 1e-2
    torch.testing.assert_close(from_kohya, from_diffusers, rtol=1e-5, atol=1e-6)


def test_diffusers_loader_honours_every_module_alpha_of_our_diffusers_file(tmp_path, tiny_pipe, mixed_alpha_lora):
    state = mixed_alpha_lora
    path = write_diffusers(state, tmp_path / "pytorch_lora_weights.safetensors")
    config = json.loads(_header(path)[formats.METADATA_KEY])
    assert config["unet.alpha_pattern"] and config["text_encoder.alpha_pattern"] and config["unet.rank_pattern"]
    _, layers = _loaded(path)
    expected = _expected_scalings(state, tiny_pipe)
    for component in ("unet", "text_encoder"):
        assert layers[component] == pytest.approx(expected[component])
    assert len({round(s, 6) for s in layers["unet"].values()}) == 4  # 8/4, 2/4, 16/4, 6/2
    assert set(layers["text_encoder"].values()) == {2.0, 1.25}


def test_diffusers_file_has_adapter_metadata_per_component(tmp_path, conv_lora):
    config = json.loads(_header(write_diffusers(conv_lora, tmp_path / "x.safetensors"))[formats.METADATA_KEY])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 3.0)
    assert (config["text_encoder.r"], config["text_encoder.lora_alpha"]) == (4, 3.0)
    # patterns without `text_model.` match the CLIP tree of transformers 4 and 5
    assert all(not t.startswith("text_model.") for t in config["text_encoder.target_modules"])


# ---------------------------------------------------------------- kohya metadata and layout


def _sized_state(cross_attention_width: int, text_width: int | None, second_text_width: int | None = None, alpha: float = 8.0) -> LoraState:
    """A LoRA shaped like an SD1.x / SD2.x / SDXL one (only the widths matter to the architecture)."""
    modules = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(
            torch.randn(4, cross_attention_width), torch.randn(640, 4), alpha
        ),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(torch.randn(4, 640), torch.randn(640, 4), alpha),
    }
    if text_width:
        modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = LoraModule(
            torch.randn(4, text_width), torch.randn(text_width, 4), alpha
        )
    if second_text_width:
        modules["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"] = LoraModule(
            torch.randn(4, second_text_width), torch.randn(second_text_width, 4), alpha
        )
    return LoraState(modules)


def test_kohya_sd1_file_layout_and_metadata(tmp_path):
    state = _sized_state(768, 768)
    path = write_kohya(state, tmp_path / "sd1.safetensors")
    header = _header(path)
    assert header["ss_network_dim"] == "4" and float(header["ss_network_alpha"]) == 8.0
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    assert header["ss_network_module"] == "networks.lora"
    tensors, _ = read_tensors(path)
    # SD1's text encoder is lora_te_, never lora_te1_
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors)
    # the trained alpha, not the rank (the exporter bug DESIGN.md names)
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 3 and set(alphas.values()) == {8.0}
    assert FORMAT_METADATA_KEY not in header


def test_kohya_sdxl_file_uses_te1_te2_and_sdxl_version(tmp_path):
    state = _sized_state(2048, 768, 1280)
    path = write_kohya(state, tmp_path / "sdxl.safetensors")
    assert _header(path)["ss_base_model_version"].startswith("sdxl")
    tensors, _ = read_tensors(path)
    assert {k.split("text_model")[0] for k in tensors if k.startswith("lora_te")} == {"lora_te1_", "lora_te2_"}
    assert_same_state(read_lora(path), state)


def test_kohya_sd2_file_says_v2(tmp_path):
    header = _header(write_kohya(_sized_state(1024, 1024), tmp_path / "sd2.safetensors"))
    assert (header["ss_base_model_version"], header["ss_v2"]) == ("sd_v2", "True")


def test_kohya_metadata_network_args_for_conv(tmp_path, conv_lora):
    args = json.loads(_header(write_kohya(conv_lora, tmp_path / "x.safetensors"))["ss_network_args"])
    assert args == {"conv_dim": "4", "conv_alpha": "3"}
    linear_only = LoraState({p: m for p, m in conv_lora.modules.items() if not m.is_conv})
    assert json.loads(kohya_metadata(linear_only)["ss_network_args"]) == {}


def test_kohya_metadata_keeps_ss_keys_of_the_source_and_extra_keys(tmp_path, conv_lora):
    conv_lora.metadata.update({"ss_output_name": "my_style", "ss_resolution": "(512, 512)", "unrelated": "x"})
    header = _header(write_kohya(conv_lora, tmp_path / "x.safetensors", {"ss_training_comment": "cats"}))
    assert header["ss_output_name"] == "my_style" and header["ss_resolution"] == "(512, 512)"
    assert header["ss_training_comment"] == "cats" and "unrelated" not in header


def test_writers_refuse_nan_and_leave_no_file(tmp_path, conv_lora):
    next(iter(conv_lora.modules.values())).up[0, 0] = float("nan")
    for fmt in ("diffusers", "kohya"):
        with pytest.raises(ValueError, match="NaN"):
            write_lora(conv_lora, tmp_path / f"{fmt}.safetensors", fmt)
    assert list(tmp_path.iterdir()) == []


def test_writers_leave_only_the_output_and_replace_an_old_file(tmp_path, conv_lora):
    (tmp_path / "x.safetensors").write_text("old")
    write_kohya(conv_lora, tmp_path / "x.safetensors")
    write_diffusers(conv_lora, tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "y.safetensors"]
    assert_same_state(read_lora(tmp_path / "x.safetensors"), conv_lora)


def test_write_errors(tmp_path, conv_lora):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        write_diffusers(conv_lora, tmp_path)
    with pytest.raises(ValueError, match="cannot write format 'peft'"):
        write_lora(conv_lora, tmp_path / "x.safetensors", "peft")
    with pytest.raises(ValueError, match="text_encoder_2 modules, which SD1.x models do not have"):
        write_diffusers(_sized_state(2048, 768, 1280), tmp_path / "x.safetensors", family=SD1)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- reading: bad files and pickles


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am a text file\n", os.urandom(64), b"\x10\x00\x00\x00\x00\x00\x00\x00{}"],
    ids=["empty", "text", "random", "short-header"],
)
def test_unreadable_safetensors_is_a_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_lora(path)


def test_truncated_safetensors_is_a_value_error(tmp_path, conv_lora):
    path = write_kohya(conv_lora, tmp_path / "x.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="x.safetensors.*truncated"):
        read_lora(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_lora(tmp_path / "nope.safetensors")


def test_unknown_keys_error_names_the_file_and_the_key(tmp_path):
    save_file({"encoder.weight": torch.ones(2, 2)}, str(tmp_path / "weird.safetensors"))
    with pytest.raises(ValueError, match="weird.safetensors.*unknown LoRA format.*encoder.weight"):
        read_lora(tmp_path / "weird.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickle_needs_the_flag_and_then_loads_weights_only(tmp_path, conv_lora, suffix):
    tensors = formats.to_kohya(conv_lora, SD1)
    path = tmp_path / f"lora{suffix}"
    torch.save(tensors, path)
    with pytest.raises(ValueError, match="pickle.*--allow-pickle"):
        read_lora(path)
    assert_same_state(read_lora(path, allow_pickle=True), conv_lora)


def test_pickle_with_a_state_dict_level_loads(tmp_path, conv_lora):
    torch.save({"state_dict": formats.to_kohya(conv_lora, SD1)}, tmp_path / "lora.ckpt")
    assert_same_state(read_lora(tmp_path / "lora.ckpt", allow_pickle=True), conv_lora)


class _RunsCode:
    """Unpickling this calls os.system: what a malicious .ckpt does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_even_with_the_flag(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as handle:
        pickle.dump({"lora_unet_a.lora_down.weight": torch.ones(1, 1), "payload": _RunsCode(str(marker))}, handle)
    with pytest.raises(ValueError, match="evil.bin.*could run code.*even with --allow-pickle"):
        read_lora(path, allow_pickle=True)
    assert not marker.exists()


def test_broken_or_odd_pickles_are_value_errors(tmp_path, conv_lora):
    torch.save(formats.to_kohya(conv_lora, SD1), tmp_path / "whole.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.bin could not be loaded as a weights-only pickle"):
        read_lora(tmp_path / "cut.bin", allow_pickle=True)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt does not hold a flat dictionary of tensors"):
        read_lora(tmp_path / "list.pt", allow_pickle=True)
