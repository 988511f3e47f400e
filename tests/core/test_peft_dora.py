"""peft's DoRA (`LoraConfig(use_dora=True)`) in the files diffusers users have (issue 24): made by peft and diffusers'
own code on the tiny model's Linears, 1x1 and 3x3 convs (UNet and text encoder), in the layout `save_lora_weights`
writes peft's state dict in and in the one diffusers' `convert_state_dict_to_diffusers` gives it; read, merged (in
memory and into a folder) and loaded to peft's own merged weights; inspected; written as kohya (LyCORIS's
`dora_scale`) and read back, by sdlora and by LyCORIS."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.core import formats
from sdlora.core.files import read_lora
from sdlora.core.kinds import DoraModule
from sdlora.core.state import LoraModule
from sdlora.inference.adapters import load_lora
from sdlora.inference.merge import merge_lora, merge_model
from sdlora.models.loading import load_pipeline
from sdlora.models.tiny import build_tiny_pipeline

# Linears (square, wider input, wider output), 1x1 convs (square proj_in, conv_shortcut 32->64 and up-block ones)
# and 3x3 convs (conv_in 4->32, square and 32->64 conv1); conv1 at its own rank and alpha
UNET_TARGETS = ["attn1.to_q", "attn2.to_k", "to_out.0", "ff.net.2", "proj_in", "conv_shortcut", "conv1", "conv_in"]
TEXT_TARGETS = ["q_proj", "out_proj", "fc1", "fc2"]  # fc1 is 32 -> 37, fc2 37 -> 32
TOLERANCE = 1e-5
OLD_PAIR = {"unet.a.lora.down.weight": torch.ones(4, 8), "unet.a.lora.up.weight": torch.ones(8, 4)}


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach(), reference.detach()
    return float((ours - reference).abs().max() / reference.abs().max())


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "merge")}


@pytest.fixture(scope="module")
def peft_dora(tmp_path_factory):
    """({layout: file}, {"unet.<name>" / "text_encoder.<name>": peft's merged weight}) for one peft DoRA."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_pipeline()
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=6, rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 5}, target_modules=UNET_TARGETS, use_dora=True)
    )
    pipe.text_encoder.add_adapter(LoraConfig(r=3, lora_alpha=7, target_modules=TEXT_TARGETS, use_dora=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B non-zero, and a magnitude that is not the norm of W + dW
        for component in (pipe.unet, pipe.text_encoder):
            for name, parameter in component.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
                elif "lora_magnitude_vector" in name:
                    parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("peft-dora")
    layers = {"unet": get_peft_model_state_dict(pipe.unet), "text_encoder": get_peft_model_state_dict(pipe.text_encoder)}
    metadata = {
        "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict(),
        "text_encoder_lora_adapter_metadata": pipe.text_encoder.peft_config["default"].to_dict(),
    }
    files = {}
    for layout, convert in (("peft", dict), ("converted", convert_state_dict_to_diffusers)):
        files[layout] = folder / f"{layout}.safetensors"
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=convert(layers["unet"]),
            text_encoder_lora_layers=convert(layers["text_encoder"]),
            weight_name=files[layout].name,
            **metadata,
        )
    merged = {}
    for component in ("unet", "text_encoder"):
        for name, layer in _lora_layers(getattr(pipe, component)).items():
            base = layer.get_base_layer().weight.detach().clone()
            plain = base + layer.get_delta_weight("default")
            layer.merge()
            merged[f"{component}.{name}"] = layer.get_base_layer().weight.detach().clone()
            # the DoRA moves the weight, and its magnitude matters: it is not W + dW renormalised to W's norms
            assert _relative(base, merged[f"{component}.{name}"]) > 1e-2 and _relative(plain, merged[f"{component}.{name}"]) > 1e-2
    return files, merged


def _file_path(path: str) -> str:
    """A LoraState path as the file (and this transformers' text encoder) spells it: without `text_model.`."""
    return path.replace("text_encoder.text_model.", "text_encoder.")


def _layer_modules(pipe) -> dict[str, torch.nn.Module]:
    return {f"{component}.{name}": module for component in ("unet", "text_encoder") for name, module in getattr(pipe, component).named_modules() if hasattr(module, "weight")}  # fmt: skip


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in _layer_modules(pipe).items()}


def _errors(pipe, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """{"linear" / "conv1x1" / "conv3x3": the largest relative error of an adapted weight of that kind}."""
    weights, errors = _weights(pipe), {}
    for name, expected in reference.items():
        kind = "linear" if expected.ndim == 2 else f"conv{expected.shape[-1]}x{expected.shape[-1]}"
        errors[kind] = max(errors.get(kind, 0.0), _relative(weights[name].detach(), expected))
    return errors


def _check(pipe, reference: dict[str, torch.Tensor]) -> None:
    errors = _errors(pipe, reference)
    assert set(errors) == {"linear", "conv1x1", "conv3x3"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("layout", ["peft", "converted"])
def test_a_diffusers_dora_file_reads_and_merges_to_peft_merged_weights(peft_dora, layout):
    files, reference = peft_dora
    tensors = load_file(files[layout])
    # what peft stores (DoraConv2dLayer's norm per output channel, kept as [1, out, 1, 1]; a Linear's as [out])
    key = "unet.down_blocks.1.resnets.0.conv1.lora_magnitude_vector"
    assert tuple(tensors[key].shape) == (1, 64, 1, 1) and tuple(tensors[key.replace("magnitude_vector", "A.weight")].shape) == (2, 32, 3, 3)
    assert tuple(tensors["text_encoder.encoder.layers.0.mlp.fc1.lora_magnitude_vector"].shape) == (37,)
    state = read_lora(files[layout])
    assert state.metadata["sdlora_format"] == (formats.DIFFUSERS if layout == "peft" else formats.DIFFUSERS_OLD)
    assert {_file_path(path) for path in state.modules} == set(reference)
    assert state.kinds() == ["dora"]
    conv1 = state.modules["unet.down_blocks.1.resnets.0.conv1"]
    assert (conv1.rank, conv1.alpha) == (2, 5.0) and state.modules["text_encoder.text_model.encoder.layers.1.mlp.fc1"].alpha == 7.0
    pipe = build_tiny_pipeline()
    merge_lora(pipe, [(files[layout], 1.0)])
    _check(pipe, reference)


def test_a_peft_dora_merges_into_a_folder_and_loads_as_peft_merges_it(peft_dora, tiny_model_dir, tmp_path):
    files, reference = peft_dora
    out = merge_model(tiny_model_dir, [(files["converted"], 1.0)], out_dir=tmp_path / "merged")
    _check(load_pipeline(str(out)), reference)
    pipe = build_tiny_pipeline()
    load_lora(pipe, files["peft"])
    _check(pipe, reference)


def test_inspect_names_the_peft_dora(peft_dora, capsys):
    files, reference = peft_dora
    assert main(["inspect", str(files["converted"])]) == 0
    out = capsys.readouterr().out
    assert f"DoRA (LoRA) ({len(reference)} modules, dim 2/3/4, alpha 5/6/7)" in out
    assert re.search(r"modules: .*conv3x3.*conv1x1|modules: .*conv1x1.*conv3x3", out)


def test_a_peft_dora_converted_to_kohya_applies_the_same_update(peft_dora, tmp_path):
    files, reference = peft_dora
    out = tmp_path / "kohya.safetensors"
    assert main(["convert", str(files["peft"]), str(out), "--to", "kohya"]) == 0
    tensors = load_file(out)
    # LyCORIS's layout for a magnitude per output row (wd_on_out): [out, 1] and [out, 1, 1, 1]
    assert tuple(tensors["lora_unet_down_blocks_1_resnets_0_conv1.dora_scale"].shape) == (64, 1, 1, 1)
    assert tuple(tensors["lora_unet_mid_block_attentions_0_proj_in.dora_scale"].shape) == (64, 1, 1, 1)
    assert tuple(tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"].shape) == (37, 1)
    pipe = build_tiny_pipeline()
    merge_lora(pipe, [(out, 1.0)])
    _check(pipe, reference)

    # LyCORIS reading the same file: each layer's module from our tensors, its merged weight (wd_on_out, as it loads them)
    pytest.importorskip("lycoris")
    from lycoris.modules import get_module, make_module

    layers = {_file_path(name): module for name, module in _layer_modules(build_tiny_pipeline()).items()}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for name, expected in reference.items():
        component, _, path = name.partition(".")
        lora_name = prefixes[component] + (path if component == "unet" else "text_model." + path).replace(".", "_")
        lycoris_type, params = get_module(tensors, lora_name)
        merged, _ = make_module(lycoris_type, params, lora_name, layers[name]).get_merged_weight(1.0)
        assert _relative(merged, expected) < TOLERANCE, name


def test_diffusers_older_magnitude_names_read_as_diffusers_maps_them(peft_dora, tmp_path):
    """diffusers' state_dict_utils also reads a magnitude named in the attention-processor spelling (UNet
    `attn1.processor.to_out.lora_magnitude_vector` = to_out.0, CLIP `self_attn.to_q.lora_magnitude_vector` =
    q_proj): sdlora reads each to the module diffusers maps it to."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    files, _ = peft_dora
    converted = load_file(files["converted"])
    older = {}
    for key, tensor in converted.items():
        key = re.sub(r"\.(attn\d)\.to_(q|out)(\.0)?\.lora\.", r".\1.processor.to_\2_lora.", key)
        key = re.sub(r"\.(attn\d)\.to_(q|out)(\.0)?\.lora_magnitude_vector", r".\1.processor.to_\2.lora_magnitude_vector", key)
        key = re.sub(r"\.self_attn\.(q|out)_proj\.lora_linear_layer\.", r".self_attn.to_\1_lora.", key)
        older[re.sub(r"\.self_attn\.(q|out)_proj\.lora_magnitude_vector", r".self_attn.to_\1.lora_magnitude_vector", key)] = tensor
    assert any(".processor.to_out.lora_magnitude_vector" in k for k in older) and any(
        "self_attn.to_q.lora_magnitude_vector" in k for k in older
    )
    save_file(older, str(tmp_path / "older.safetensors"))
    state = read_lora(tmp_path / "older.safetensors")
    expected = read_lora(files["converted"])
    assert set(state.modules) == set(expected.modules)
    for path, module in state.modules.items():
        assert all(torch.equal(module.factors()[name], t) for name, t in expected.modules[path].factors().items()), path
    # diffusers' own reading of the same keys names the same modules
    unet = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in older.items() if k.startswith("unet.")})
    text = convert_state_dict_to_peft(
        convert_state_dict_to_diffusers({k.removeprefix("text_encoder."): v for k, v in older.items() if k.startswith("text_encoder.")})
    )
    theirs = {f"unet.{k}" for k in unet} | {_file_path(f"text_encoder.{k}") for k in text}
    ours = {
        f"{_file_path(path)}.{suffix}" for path in state.modules for suffix in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    assert theirs == ours


def test_a_square_conv_magnitude_reads_per_output_row_from_peft_and_per_input_column_from_lycoris():
    """[1, 32, 1, 1] beside a [32, 32, 3, 3] conv: peft's `lora_magnitude_vector` is per output channel, LyCORIS's
    `dora_scale` of that shape per input channel (wd_on_out=False); the shape alone cannot tell them apart."""
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, 32, 3, 3, generator=generator), torch.randn(32, 2, 1, 1, generator=generator)
    magnitude = torch.rand(1, 32, 1, 1, generator=generator) + 0.5
    weight = torch.randn(32, 32, 3, 3, generator=generator)
    peft = formats.to_lora_state(
        {"unet.conv_in.lora_A.weight": down, "unet.conv_in.lora_B.weight": up, "unet.conv_in.lora_magnitude_vector": magnitude}
    )
    kohya = formats.to_lora_state({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up, "lora_unet_conv_in.dora_scale": magnitude})  # fmt: skip
    full = weight + up.flatten(1).mm(down.flatten(1)).view(weight.shape)
    per_output = magnitude.view(-1, 1, 1, 1) * full / full.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    per_input = magnitude * full / full.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, 1, 1)
    torch.testing.assert_close(peft.modules["unet.conv_in"].apply(weight.clone()), per_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kohya.modules["unet.conv_in"].apply(weight.clone()), per_input, rtol=1e-5, atol=1e-6)
    assert DoraModule(LoraModule(down, up), magnitude, on_output=True).to(torch.float16).on_output


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({**OLD_PAIR, "unet.b.lora_magnitude_vector": torch.ones(8)}, "'unet.b.lora_magnitude_vector' maps to no module (no LoRA down/up pair"),
        ({**OLD_PAIR, "unet.a.lora_magnitude_vector": torch.ones(5)}, "'unet.a' (DoRA): DoRA magnitude (5,) does not fit the 8 output rows"),
        ({**OLD_PAIR, "unet.b.lora_A.weight": torch.ones(4, 8)}, "'unet.b' has no .lora_B.weight tensor"),
        ({**OLD_PAIR, "unet.a.lora_magnitude": torch.ones(8)}, "'unet.a.lora_magnitude' maps to no module (expected a name ending in .down.weight, .up.weight, .lora_A.weight"),
        ({**OLD_PAIR, "unet.a.lora_A.weight": torch.ones(4, 8), "unet.a.lora_B.weight": torch.ones(8, 4)}, "adapts unet.a, which another key"),
    ],
    ids=["magnitude-without-lora", "magnitude-of-no-axis", "down-only", "stray", "module-twice"],
)  # fmt: skip
def test_a_converted_layout_key_that_maps_to_nothing_is_an_error_naming_it(tensors, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        formats.to_lora_state(tensors)
