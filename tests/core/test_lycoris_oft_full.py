"""OFT/BOFT and full-diff files made by lycoris-lora 4.1.3's own code, read and merged by sdlora, against LyCORIS's
forward pass (issue 24): every OFT/BOFT option LyCORIS writes (constraint none / binding / loose, rescale on and off,
block sizes from several dims, Linear, 1x1 and 3x3 convs), and full diffs (with and without `diff_b`) merged into a
folder and into a pipeline in memory at a weight below 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.core.files import read_lora
from sdlora.core.inspection import describe, format_description
from sdlora.core.kinds import OftModule
from sdlora.core.state import LoraState
from sdlora.inference.merge import merge_lora
from sdlora.models.loading import load_pipeline
from sdlora.models.tiny import build_tiny_pipeline

TOLERANCE = 1e-5
SELF_ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
# the layers of a small UNet-named module, each with its input width: in != out, with and without a bias
LAYERS = {
    "down_blocks.0.resnets.0.conv1": ("conv3x3", 12, True),
    "down_blocks.1.attentions.0.proj_in": ("conv1x1", 20, True),
    f"{SELF_ATTN}.to_q": ("linear", 40, False),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": ("linear", 24, False),
    f"{SELF_ATTN}.to_out.0": ("linear", 36, True),
}
# output widths per LyCORIS dim, each one BOFT can split (an even block size times a power of 2): BOFT blocks of
# 2, 4, 6 and 10/12/16 rows in butterflies of 2 to 6 stages (diag-OFT splits the same widths its own way)
WIDTHS = {2: (16, 32, 64, 8, 16), 4: (32, 64, 16, 8, 64), 8: (48, 96, 24, 12, 96), 16: (320, 160, 96, 40, 64)}
CONSTRAINTS = {"none": 0.0, "binding": 1e-3, "loose": 1.0}  # LyCORIS bounds ||Q|| by constraint * output rows
# the class attributes LyCORIS's apply_preset sets (process-wide): put back after each network
PRESET_ATTRIBUTES = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
                     "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")  # fmt: skip


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def _unet_named_module(dim: int) -> torch.nn.Module:
    """Linear and conv layers under UNet paths (so LyCORIS's kohya-style names read as UNet modules)."""
    torch.manual_seed(dim)
    root = torch.nn.Module()
    for (path, (layer_kind, width_in, bias)), width_out in zip(LAYERS.items(), WIDTHS[dim]):
        if layer_kind == "linear":
            layer = torch.nn.Linear(width_in, width_out, bias=bias)
        else:
            size = 3 if layer_kind == "conv3x3" else 1
            layer = torch.nn.Conv2d(width_in, width_out, size, padding=size // 2, bias=bias)
        *parents, leaf = path.split(".")
        parent = root
        for name in parents:
            if name not in parent._modules:
                parent.add_module(name, torch.nn.Module())
            parent = parent._modules[name]
        parent.add_module(leaf, layer)
    return root


def _layer_input(layer: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 5, 6, generator=generator)


def _layer_output(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, layer.bias)
    return torch.nn.functional.conv2d(x, weight, layer.bias, padding=layer.padding)


@pytest.fixture
def lycoris_network():
    """`make(root, algo, dim, **options)`: LyCORIS's LycorisNetwork on every Linear/Conv2d of `root`, its names
    prefixed `lora_unet` (kohya's UNet spelling); the preset LyCORIS keeps on its class is restored afterwards."""
    pytest.importorskip("lycoris")
    from lycoris.wrapper import LycorisNetwork

    saved = {name: getattr(LycorisNetwork, name) for name in PRESET_ATTRIBUTES}
    preset = {"enable_conv": True, "target_module": ["Linear", "Conv2d"], "target_name": [], "lora_prefix": "lora_unet",
              "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}  # fmt: skip

    def make(root: torch.nn.Module, algo: str, dim: int, **options):
        LycorisNetwork.apply_preset(preset)
        # alpha 0 as in the issue: OFT/BOFT take no alpha (their stored `alpha` is the constraint)
        network = LycorisNetwork(root, 1.0, lora_dim=dim, conv_lora_dim=dim, alpha=0, conv_alpha=0, network_module=algo, **options)
        network.apply_to()
        return network

    yield make
    for name, value in saved.items():
        setattr(LycorisNetwork, name, value)


@pytest.mark.parametrize("dim", list(WIDTHS))
@pytest.mark.parametrize("rescaled", [False, True], ids=["plain", "rescaled"])
@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
@pytest.mark.parametrize("algo", ["boft", "diag-oft"])
def test_lycoris_oft_and_boft_merge_to_what_lycoris_applies(lycoris_network, tmp_path, algo, constraint, rescaled, dim):
    root = _unet_named_module(dim)
    base = {path: root.get_submodule(path).weight.detach().clone() for path in LAYERS}
    network = lycoris_network(root, algo, dim, constraint=CONSTRAINTS[constraint], rescaled=rescaled)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("rescale"):  # a rescale near 1
                parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, None)
    state = read_lora(path)
    assert len(state.modules) == len(LAYERS)
    for layer_path in LAYERS:
        layer = root.get_submodule(layer_path)
        module = state.modules[f"unet.{layer_path}"]
        assert module.kind == ("boft" if algo == "boft" else "oft") and (module.rescale is not None) == rescaled
        assert module.fits(tuple(base[layer_path].shape))
        x = _layer_input(layer, generator)
        with torch.no_grad():
            network.set_multiplier(1.0)
            reference = layer(x)  # LyCORIS's forward pass
            network.set_multiplier(0.7)
            reference_at_07 = layer(x)
            unchanged = _layer_output(layer, base[layer_path], x)
            merged = _layer_output(layer, module.apply(base[layer_path].clone()), x)
            blended = _layer_output(layer, module.apply(base[layer_path].clone(), 0.7), x)
        assert _relative(unchanged, reference) > 1e-3, layer_path  # the file does turn the layer
        assert _relative(merged, reference) < TOLERANCE, layer_path
        # below weight 1 sdlora blends W with OFT(W) (core/kinds.py); LyCORIS moves R towards I instead, the same
        # rule for OFT without rescale (R^T is linear in R), not with a rescale or over a butterfly's stages
        assert _relative(blended, unchanged + 0.7 * (reference - unchanged)) < TOLERANCE, layer_path
        if algo == "diag-oft" and not rescaled:
            assert _relative(blended, reference_at_07) < TOLERANCE, layer_path
    expected = "no constraint" if constraint == "none" else f"constraint {CONSTRAINTS[constraint]:g}"
    assert f"{'BOFT' if algo == 'boft' else 'OFT'} ({len(LAYERS)} modules, blocks of " in format_description(describe(state))
    assert f", {expected})" in format_description(describe(state))


def test_inspect_says_which_ofts_have_no_constraint():
    blocks = torch.randn(16, 4, 4) * 0.1
    modules = {f"unet.{SELF_ATTN}.to_q": OftModule(blocks, None, 0.0), f"unet.{SELF_ATTN}.to_k": OftModule(blocks, None, 1e-3)}
    assert "OFT (2 modules, blocks of 4, constraint none/0.001)" in format_description(describe(LoraState(modules)))


# ---------------------------------------------------------------- full diffs

# attention (to_q/k/v: no bias, so no diff_b; to_out.0 with one), 1x1 convs (proj_in/out, the resnet shortcut),
# 3x3 convs (resnets) and the text encoder's attention (biases)
FULL_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention"]
text_encoder_target_name = []
"""
CONV3X3 = "down_blocks.0.resnets.0.conv1"


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's and the UNet's outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 32, 32, generator=generator)
    ids = torch.randint(0, 400, (2, 77), generator=generator)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return hidden, pipe.unet(latents, torch.tensor([10, 500]), hidden).sample


@pytest.fixture(scope="module")
def lycoris_full_file(tmp_path_factory):
    """(file written by LyCORIS's kohya network with algo=full, LyCORIS's outputs with it at weight 0.7, the base
    model's outputs)."""
    pytest.importorskip("lycoris")
    from lycoris.kohya import create_network

    folder = tmp_path_factory.mktemp("full")
    (folder / "preset.toml").write_text(FULL_PRESET)
    pipe = build_tiny_pipeline()
    base = _outputs(pipe)
    network = create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, preset=str(folder / "preset.toml"), algo="full")
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():  # each holds W + diff (b + diff_b): the diff is what is added here
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    path = folder / "full.safetensors"
    network.save_weights(str(path), torch.float32, None)
    network.set_multiplier(0.7)
    return path, _outputs(pipe), base


def test_the_lycoris_full_file_covers_attention_convs_and_both_bias_cases(lycoris_full_file):
    path, _, _ = lycoris_full_file
    tensors = load_file(path)
    diffs = {key.removesuffix(".diff"): tensor for key, tensor in tensors.items() if key.endswith(".diff")}
    with_bias = {key.removesuffix(".diff_b") for key in tensors if key.endswith(".diff_b")}
    assert f"lora_unet_{SELF_ATTN.replace('.', '_')}_to_q" in set(diffs) - with_bias  # no bias, no diff_b
    assert f"lora_unet_{SELF_ATTN.replace('.', '_')}_to_out_0" in with_bias
    assert {tuple(t.shape[2:]) for t in diffs.values() if t.ndim == 4} == {(1, 1), (3, 3)}
    assert any(key.startswith("lora_te_") for key in diffs) and any(key.startswith("lora_te_") for key in with_bias)


def test_a_lycoris_full_diff_merges_into_a_folder_at_a_weight_below_one(lycoris_full_file, tiny_model_dir, tmp_path, capsys):
    """`sdlora merge --lora full.safetensors:0.7` (a TypeError on the diff_b bias before issue 24's fix)."""
    path, (reference_text, reference_unet), (base_text, base_unet) = lycoris_full_file
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", f"{path}:0.7", "--out", str(out)]) == 0
    modules = len(read_lora(path).modules)  # a module's weight and bias updates count once
    assert capsys.readouterr().out.startswith(f"merged {modules} LoRA modules into ")
    text, unet = _outputs(load_pipeline(str(out)))
    assert _relative(base_unet, reference_unet) > 1e-3 and _relative(base_text, reference_text) > 1e-3
    assert _relative(text, reference_text) < TOLERANCE and _relative(unet, reference_unet) < TOLERANCE
    # the documented rule for an additive kind: W + 0.7 * diff, the bias b + 0.7 * diff_b
    before, after = (load_file(folder / "unet/diffusion_pytorch_model.safetensors") for folder in (tiny_model_dir, out))
    file = load_file(path)
    name = f"lora_unet_{CONV3X3.replace('.', '_')}"
    for param, field in (("weight", "diff"), ("bias", "diff_b")):
        expected = before[f"{CONV3X3}.{param}"] + 0.7 * file[f"{name}.{field}"]
        torch.testing.assert_close(after[f"{CONV3X3}.{param}"], expected, rtol=0, atol=1e-6)
    untouched = "conv_in.weight"  # outside the preset: copied as it was
    assert torch.equal(after[untouched], before[untouched])


def test_a_lycoris_full_diff_merges_into_a_pipeline_in_memory_at_a_weight_below_one(lycoris_full_file):
    path, (reference_text, reference_unet), _ = lycoris_full_file
    pipe = build_tiny_pipeline()
    merge_lora(pipe, [(path, 0.7)])
    text, unet = _outputs(pipe)
    assert _relative(text, reference_text) < TOLERANCE and _relative(unet, reference_unet) < TOLERANCE
