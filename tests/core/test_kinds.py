"""Adapter kinds against LyCORIS's own code: files made by lycoris-lora 4.1.3 merge (and load) to what its forward
pass applies; the tensor names ComfyUI/A1111 read; peft's DoRA; DoRA below weight 1; unmerge; inspect."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.core import formats
from sdlora.core.families import SD1
from sdlora.core.files import read_lora
from sdlora.core.inspection import describe, format_description
from sdlora.core.kinds import BoftModule, DoraModule, FullModule, GloraModule, Ia3Module, LohaModule, LokrModule, OftModule
from sdlora.core.state import LoraModule, LoraState
from sdlora.inference.adapters import load_lora, set_lora_scales, unload_loras
from sdlora.inference.merge import merge_lora, merge_model
from sdlora.models.tiny import build_tiny_pipeline

# LyCORIS's "full" preset also matches TimestepEmbedding, whose layers it then adapts twice (a 4.1.3 bug on diffusers
# UNets): the same modules without it
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# BOFT needs output widths of a power of 2 times its block size: the tiny UNet's attention layers have them
BOFT_PRESET = """
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""
KINDS = {
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr"),
    "lokr-factored-both": dict(algo="lokr", decompose_both=True, factor=2),
    "lokr-tucker": dict(algo="lokr", use_tucker=True, factor=4),
    "full": dict(algo="full"),
    "dora-on-output": dict(algo="lora", dora_wd=True),
    "dora-on-input": dict(algo="lora", dora_wd=True, wd_on_output=False),
    "loha-dora": dict(algo="loha", dora_wd=True),
    "oft": dict(algo="diag-oft"),
    "oft-rescaled-constrained": dict(algo="diag-oft", rescaled=True, constraint=1e-3),
    "boft": dict(algo="boft", rescaled=True),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora"),
}
EXPECTED_KIND = {
    "locon-tucker": "LoRA", "loha": "LoHa", "loha-tucker": "LoHa", "lokr": "LoKr", "lokr-factored-both": "LoKr", "lokr-tucker": "LoKr",
    "full": "full-weight diff", "dora-on-output": "DoRA (LoRA)", "dora-on-input": "DoRA (LoRA)", "loha-dora": "DoRA (LoHa)",
    "oft": "OFT", "oft-rescaled-constrained": "OFT", "boft": "BOFT", "ia3": "IA3", "glora": "GLoRA",
}  # fmt: skip


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's and the UNet's outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 32, 32, generator=generator)
    ids = torch.randint(0, 400, (2, 77), generator=generator)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return hidden, pipe.unet(latents, torch.tensor([10, 500]), hidden).sample


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=list(KINDS))
def lycoris_file(request, tmp_path_factory):
    """(kind, file written by LyCORIS's kohya network, the outputs of LyCORIS's forward pass with it applied)."""
    pytest.importorskip("lycoris")
    from lycoris.kohya import create_network

    folder = tmp_path_factory.mktemp(request.param)
    (folder / "preset.toml").write_text(BOFT_PRESET if request.param == "boft" else PRESET)
    pipe = build_tiny_pipeline()
    network = create_network(
        1.0, 4, 2, None, pipe.text_encoder, pipe.unet, conv_dim=4, conv_alpha=3, preset=str(folder / "preset.toml"), **KINDS[request.param]
    )  # alpha != dim
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith(("dora_scale", "rescale")):  # a learnt magnitude near the weight's own norm, a rescale near 1
                parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = folder / f"{request.param}.safetensors"
    network.save_weights(str(path), torch.float32, None)
    return request.param, path, _outputs(pipe)


@pytest.mark.slow  # a LyCORIS network per kind
def test_a_lycoris_file_merges_and_loads_to_what_lycoris_applies(lycoris_file):
    kind, path, (reference_text, reference_unet) = lycoris_file
    base_text, base_unet = _outputs(build_tiny_pipeline())
    assert _relative(base_unet, reference_unet) > 1e-3  # the file does change the model
    merged = build_tiny_pipeline()
    merge_lora(merged, [(path, 1.0)])
    text, unet = _outputs(merged)
    assert _relative(text, reference_text) < 1e-5 and _relative(unet, reference_unet) < 1e-5, kind
    loaded = build_tiny_pipeline()
    name = load_lora(loaded, path)
    text, unet = _outputs(loaded)
    assert _relative(text, reference_text) < 1e-5 and _relative(unet, reference_unet) < 1e-5, kind
    set_lora_scales(loaded, {name: 0.0})
    assert torch.equal(_outputs(loaded)[1], base_unet)  # weight 0 is the base model
    unload_loras(loaded)
    fresh = build_tiny_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), fresh.unet.state_dict().values()))
    info = describe(read_lora(path), path)
    assert EXPECTED_KIND[kind] in info["adapter_kinds"], info["adapter_kinds"]
    assert f"kinds:         {EXPECTED_KIND[kind]} (" in format_description(info)


# ---------------------------------------------------------------- the tensor names the UIs read


def _write_and_read(module) -> tuple[set[str], LoraState]:
    state = LoraState({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": module})
    tensors = formats.to_kohya(state, SD1)
    return {key.split(".", 1)[1] for key in tensors}, formats.to_lora_state(tensors)


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (LoraModule(torch.randn(2, 8, 1, 1), torch.randn(8, 2, 1, 1), 1.0, mid=torch.randn(2, 2, 3, 3)), {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}),
        (LohaModule(torch.randn(8, 2), torch.randn(2, 8), torch.randn(8, 2), torch.randn(2, 8), 3.0), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
        (LohaModule(torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 8), torch.randn(2, 4), 3.0, t1=torch.randn(2, 2, 3, 3), t2=torch.randn(2, 2, 3, 3)), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
        (LokrModule(w1=torch.randn(2, 2), w2a=torch.randn(4, 2), w2b=torch.randn(2, 4), alpha=3.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
        (LokrModule(w1=torch.randn(2, 2), w2=torch.randn(4, 4)), {"lokr_w1", "lokr_w2"}),  # neither half factored: no alpha
        (FullModule(torch.randn(8, 8), torch.randn(8)), {"diff", "diff_b"}),
        (DoraModule(LoraModule(torch.randn(2, 8), torch.randn(8, 2), 3.0), torch.rand(8, 1)), {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}),
        (OftModule(torch.randn(2, 4, 4), torch.rand(8, 1), 0.5), {"oft_blocks", "rescale", "alpha"}),
        (BoftModule(torch.randn(2, 4, 2, 2), None, 0.0), {"oft_blocks", "alpha"}),
        (Ia3Module(torch.randn(8), torch.tensor(1)), {"weight", "on_input"}),
        (GloraModule(torch.randn(8, 2), torch.randn(2, 8), torch.randn(8, 2), torch.randn(2, 8), alpha=3.0), {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}),
    ],
    ids=["locon-tucker", "loha", "loha-tucker", "lokr", "lokr-whole", "full", "dora", "oft", "boft", "ia3", "glora"],
)  # fmt: skip
def test_each_kind_is_written_with_the_names_comfyui_and_a1111_read_and_reads_back(module, names):
    written, state = _write_and_read(module)
    assert written == names
    (read,) = state.modules.values()
    assert read.kind == module.kind and read.factors().keys() == module.factors().keys()
    assert all(torch.equal(read.factors()[k], v) for k, v in module.factors().items())
    assert read.effective_alpha == module.effective_alpha


def test_ia3_scales_rows_or_input_channels_over_a_conv_kernel():
    weight = torch.randn(6, 4, 3, 3)
    rows = Ia3Module(torch.arange(6.0), torch.tensor(0))
    expected = weight * (1 + 0.5 * torch.arange(6.0)).view(6, 1, 1, 1)
    torch.testing.assert_close(rows.apply(weight.clone().reshape(6, -1), 0.5).view(weight.shape), expected)
    columns = Ia3Module(torch.arange(4.0).view(1, 4, 1, 1), torch.tensor(1))  # a conv's [1, in, 1, 1], as LyCORIS saves it
    expected = weight * (1 + torch.arange(4.0)).view(1, 4, 1, 1)
    torch.testing.assert_close(columns.apply(weight.clone().reshape(6, -1)).view(weight.shape), expected)
    assert rows.fits((6, 4, 3, 3)) and not rows.fits((4, 6)) and columns.fits((6, 4, 3, 3)) and not columns.fits((6, 5))


def test_glora_reads_both_lycoris_namings_to_the_same_update():
    """LyCORIS 4 (a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in]) and the naming before 2.0 (the numbers swapped),
    which A1111's network_glora.py computes as b2 @ b1 + W @ a2 @ a1, on a square layer where both could chain."""
    generator = torch.Generator().manual_seed(4)
    a_in, a_out, up, down = (torch.randn(s, generator=generator) for s in ((16, 2), (2, 16), (16, 2), (2, 16)))
    weight = torch.randn(16, 16, generator=generator)
    new, old = GloraModule(a_in, a_out, up, down, alpha=1.0), GloraModule(a_out, a_in, down, up, alpha=1.0)
    a1111 = weight + 0.5 * (up @ down + weight @ a_in @ a_out)  # alpha / dim = 1 / 2
    torch.testing.assert_close(new.apply(weight.clone()), a1111)
    torch.testing.assert_close(old.apply(weight.clone()), a1111)
    torch.testing.assert_close(new.apply(weight[4:9].clone(), 1.0, rows=(4, 9)), a1111[4:9])  # a piece of rows alone


def test_oft_rotates_blocks_orthogonally_and_a_weight_interpolates():
    weight = torch.randn(8, 5)
    oft = OftModule(torch.randn(2, 4, 4) * 0.3, None, 0.0)
    adapted = oft.apply(weight.clone())
    for block in range(2):  # each block of rows turned by an orthogonal matrix: row norms of the block's columns kept
        rows = slice(4 * block, 4 * block + 4)
        torch.testing.assert_close(adapted[rows].norm(dim=0), weight[rows].norm(dim=0))
    torch.testing.assert_close(oft.apply(weight.clone(), 0.25), weight + 0.25 * (adapted - weight))
    assert torch.equal(oft.apply(weight.clone(), 0.0), weight)
    constrained = OftModule(oft.blocks, None, 1e-3)  # ||Q|| held to 1e-3 * out rows: almost the identity
    assert (constrained.apply(weight.clone()) - weight).abs().max() < 0.1 * (adapted - weight).abs().max()


def test_lokr_scale_is_one_when_neither_half_is_factored_and_alpha_over_dim_once_otherwise():
    whole = LokrModule(w1=torch.ones(2, 2), w2=torch.ones(2, 2), alpha=7.0)
    assert whole.scale == 1.0 and torch.equal(whole.apply(torch.zeros(4, 4)), torch.ones(4, 4))
    factored = LokrModule(w1=torch.ones(2, 2), w2a=torch.ones(2, 3), w2b=torch.ones(3, 2), alpha=1.5)
    assert factored.scale == 0.5  # 1.5 / dim 3, once (LyCORIS 4.1.3's merge_to would give 0.25)
    assert torch.equal(factored.apply(torch.zeros(4, 4)), torch.full((4, 4), 3 * 0.5))
    assert LohaModule(torch.ones(2, 4), torch.ones(4, 2), torch.ones(2, 4), torch.ones(4, 2), None).scale == 1.0  # no alpha: scale 1


# ---------------------------------------------------------------- DoRA


def test_dora_below_weight_one_blends_the_base_with_the_full_dora_weight():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=generator)
    dora = DoraModule(
        LoraModule(torch.randn(2, 5, generator=generator), torch.randn(6, 2, generator=generator), 1.0),
        torch.rand(6, 1, generator=generator) + 0.5,
    )
    full = weight + dora.inner.delta()
    expected_full = full * (dora.magnitude / full.norm(dim=1, keepdim=True))
    torch.testing.assert_close(dora.apply(weight.clone(), 1.0), expected_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dora.apply(weight.clone(), 0.3), weight + 0.3 * (expected_full - weight), rtol=1e-5, atol=1e-6)
    assert torch.equal(dora.apply(weight.clone(), 0.0), weight)


def test_peft_dora_merges_to_peft_own_merged_weights(tmp_path, tiny_pipe):
    """A DoRA trained with peft (`LoraConfig(use_dora=True)`), saved through save_lora_weights, merges to what peft's
    own merge gives."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_tiny_pipeline().unet
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_dora=True, init_lora_weights="gaussian")
    )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator))
    layers = get_peft_model_state_dict(unet)
    assert any("lora_magnitude_vector" in key for key in layers)
    config = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config, weight_name="dora.safetensors"
    )
    state = read_lora(tmp_path / "dora.safetensors")
    assert state.kinds() == ["dora"]
    assert {module.alpha for module in state.modules.values()} == {6.0}
    merge_lora(tiny_pipe, [(state, 1.0)])
    for module in unet.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    merged = {name: p for name, p in unet.named_parameters() if "lora" not in name}
    ours = dict(tiny_pipe.unet.named_parameters())
    adapted = [name for name in merged if name.endswith(("to_q.base_layer.weight", "to_k.base_layer.weight"))]
    assert len(adapted) > 4
    for name in adapted:
        torch.testing.assert_close(ours[name.replace(".base_layer", "")], merged[name], rtol=1e-5, atol=1e-6)


def test_unmerge_refuses_dora_and_undoes_an_additive_kind(tmp_path, tiny_model_dir, capsys):
    generator = torch.Generator().manual_seed(3)
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    loha = LoraState(
        {path: LohaModule(*(torch.randn(s, generator=generator) * 0.1 for s in ((64, 2), (2, 64), (64, 2), (2, 64))), alpha=1.0)}
    )
    merged = merge_model(tiny_model_dir, [(loha, 0.8)], out_dir=tmp_path / "merged")
    restored = merge_model(merged, [(loha, 0.8)], out_dir=tmp_path / "restored", unmerge=True)
    original, back = (load_file(folder / "unet/diffusion_pytorch_model.safetensors") for folder in (tiny_model_dir, restored))
    assert max((back[k] - v).abs().max().item() for k, v in original.items()) < 1e-6
    dora = LoraState({path: DoraModule(LoraModule(torch.randn(2, 64), torch.randn(64, 2), 1.0), torch.rand(64, 1))})
    file = formats.to_kohya(dora, SD1)
    save_file(file, str(tmp_path / "dora.safetensors"))
    assert main(["unmerge", "--model", str(merged), "--lora", str(tmp_path / "dora.safetensors"), "--out", str(tmp_path / "undone")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DoRA, whose update depends on the weight it was merged into" in err[0] and "dora.safetensors" in err[0]
    assert not (tmp_path / "undone").exists()


# ---------------------------------------------------------------- broken files: one line naming file, module and kind


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"m.hada_w1_a": torch.ones(8, 2), "m.hada_w1_b": torch.ones(3, 8), "m.hada_w2_a": torch.ones(8, 2), "m.hada_w2_b": torch.ones(2, 8)}, "(LoHa: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b): LoHa factors do not fit together"),
        ({"m.hada_w1_a": torch.ones(8, 2), "m.hada_w1_b": torch.ones(2, 8), "m.hada_w2_a": torch.ones(8, 2)}, "(LoHa: hada_w1_a, hada_w1_b, hada_w2_a) has no hada_w2_b tensor"),
        ({"m.lokr_w1": torch.ones(2, 2), "m.lokr_w2_a": torch.ones(4, 2)}, "(LoKr: lokr_w1, lokr_w2_a): LoKr needs lokr_w2, or both lokr_w2_a and lokr_w2_b"),
        ({"m.lora_down.weight": torch.ones(2, 8), "m.lora_up.weight": torch.ones(8, 2), "m.dora_scale": torch.ones(5, 1)}, "(LoRA with DoRA: alpha, dora_scale, lora_down.weight, lora_up.weight): DoRA magnitude (5, 1) fits neither"),
        ({"m.diff": torch.ones(8, 8), "m.lora_up.weight": torch.ones(8, 2)}, "holds full-weight diff and LoRA (alpha, diff, lora_up.weight): a module is of one kind"),
        ({"m.oft_blocks": torch.ones(3, 4, 4), "m.alpha": torch.tensor(0.0)}, "OFT module unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q makes a [12, any] update but weight unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight is [64, 64]"),
        ({"m.oft_blocks": torch.ones(2, 4, 5)}, "(OFT: oft_blocks): OFT oft_blocks (2, 4, 5) is not [blocks, size, size]"),
        ({"m.weight": torch.ones(64)}, "maps to no module (no tensor name sdlora knows"),
        ({"m.a1.weight": torch.ones(64, 4), "m.a2.weight": torch.ones(4, 64), "m.b1.weight": torch.ones(64, 3), "m.b2.weight": torch.ones(4, 64)}, "(GLoRA: a1.weight, a2.weight, b1.weight, b2.weight): GLoRA factors do not fit together"),
        ({"m.oft_diag": torch.ones(2, 4, 4)}, "OFT from LyCORIS before 2.0 (oft_diag) weights"),
    ],
    ids=["loha-shapes", "loha-half-missing", "lokr-half-missing", "dora-magnitude", "two-kinds", "oft-blocks-do-not-divide", "oft-blocks-not-square", "ia3-half-missing", "glora-shapes", "old-oft"],
)  # fmt: skip
def test_a_broken_file_is_one_line_naming_file_module_and_kind(tmp_path, tiny_model_dir, capsys, tensors, message):
    prefixed = {
        key.replace("m.", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.", 1): t for key, t in tensors.items()
    }
    if not any(k.endswith(("alpha", "oft_blocks")) for k in prefixed) and "lora_up.weight" in str(list(prefixed)):
        prefixed["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(1.0)
    save_file(prefixed, str(tmp_path / "broken.safetensors"))
    assert (
        main(["merge", "--model", str(tiny_model_dir), "--lora", str(tmp_path / "broken.safetensors"), "--out", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "broken.safetensors") in err[0] and message in err[0], err
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in err[0] or "OFT" in err[0]
    assert not (tmp_path / "out").exists()


def test_nan_in_a_factor_names_the_file_and_module(tmp_path, tiny_model_dir, capsys):
    bad = LoraState(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LohaModule(
                torch.full((64, 2), float("nan")), torch.ones(2, 64), torch.ones(64, 2), torch.ones(2, 64), 1.0
            )
        }
    )
    save_file(formats.to_kohya(bad, SD1), str(tmp_path / "nan.safetensors"))
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "nan.safetensors holds NaN or inf values in 1 modules (first: unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q)"
        in err
    )
    assert not (tmp_path / "out").exists()


def test_inspect_names_each_kind_with_counts_dims_and_alphas(tmp_path):
    generator = torch.Generator().manual_seed(4)
    modules = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LohaModule(*(torch.randn(s, generator=generator) for s in ((64, 4), (4, 64), (64, 4), (4, 64))), alpha=2.0),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k": LohaModule(*(torch.randn(s, generator=generator) for s in ((64, 4), (4, 64), (64, 4), (4, 64))), alpha=2.0),
        "unet.down_blocks.1.attentions.0.proj_in": FullModule(torch.randn(64, 64, 1, 1)),
    }  # fmt: skip
    path = tmp_path / "mixed.safetensors"
    save_file(formats.to_kohya(LoraState(modules), SD1), str(path))
    info = describe(read_lora(path), path)
    assert info["adapter_kinds"] == {
        "LoHa": {"modules": 2, "ranks": [4], "alphas": [2.0]},
        "full-weight diff": {"modules": 1, "ranks": [], "alphas": []},
    }
    assert "kinds:         LoHa (2 modules, dim 4, alpha 2), full-weight diff (1 modules)" in format_description(info)
    assert json.loads(json.dumps(info["adapter_kinds"]))  # JSON-ready


def test_kohya_metadata_names_lycoris_and_its_algo_as_lycoris_does():
    from sdlora.core.files import kohya_metadata

    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    oft = kohya_metadata(LoraState({path: OftModule(torch.randn(8, 8, 8), None, 0.0)}), family=SD1)
    assert oft["ss_network_module"] == "lycoris.kohya" and json.loads(oft["ss_network_args"])["algo"] == "diag-oft"
    plain = kohya_metadata(LoraState({path: LoraModule(torch.randn(2, 64), torch.randn(64, 2), 1.0)}), family=SD1)
    assert plain["ss_network_module"] == "networks.lora" and "algo" not in json.loads(plain["ss_network_args"])


def test_a_merged_kind_and_a_peft_lora_load_together_at_their_weights(tiny_pipe, random_lora_state):
    """A LoHa (merged in memory) beside a plain LoRA (peft layers): the same outputs as merging both at those weights;
    changing the weights recomputes the merged layers; unloading gives the exact base weights back."""
    generator = torch.Generator().manual_seed(8)
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    loha = LoraState(
        {path: LohaModule(*(torch.randn(s, generator=generator) * 0.2 for s in ((64, 2), (2, 64), (64, 2), (2, 64))), alpha=1.0)}
    )
    lora = random_lora_state(tiny_pipe, rank=4, alpha=2.0, seed=3)
    base = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    names = [load_lora(tiny_pipe, loha, scale=0.5, adapter_name="loha"), load_lora(tiny_pipe, lora, scale=0.7, adapter_name="lora")]
    expected = build_tiny_pipeline()
    merge_lora(expected, [(loha, 0.5), (lora, 0.7)])
    torch.testing.assert_close(_outputs(tiny_pipe)[1], _outputs(expected)[1], rtol=1e-4, atol=1e-5)
    set_lora_scales(tiny_pipe, dict(zip(names, (1.0, 0.0))))
    only_loha = build_tiny_pipeline()
    merge_lora(only_loha, [(loha, 1.0)])
    torch.testing.assert_close(_outputs(tiny_pipe)[1], _outputs(only_loha)[1], rtol=1e-4, atol=1e-5)
    unload_loras(tiny_pipe)
    assert all(torch.equal(tiny_pipe.unet.state_dict()[k], v) for k, v in base.items())


@pytest.mark.parametrize(
    "module",
    [
        LohaModule(torch.randn(16, 3), torch.randn(3, 20 * 9), torch.randn(16, 3), torch.randn(3, 20 * 9), alpha=2.0),
        LohaModule(torch.randn(3, 16), torch.randn(3, 20), torch.randn(3, 16), torch.randn(3, 20), alpha=2.0, t1=torch.randn(3, 3, 3, 3), t2=torch.randn(3, 3, 3, 3)),
        LokrModule(w1=torch.randn(4, 4), w2a=torch.randn(4, 3), w2b=torch.randn(3, 5 * 9), alpha=1.5),
        LokrModule(w1=torch.randn(2, 2), w2a=torch.randn(3, 8), w2b=torch.randn(3, 10), t2=torch.randn(3, 3, 3, 3), alpha=2.0),
        LokrModule(w1a=torch.randn(4, 2), w1b=torch.randn(2, 4), w2=torch.randn(4, 5, 3, 3)),
        FullModule(torch.randn(16, 20, 3, 3)),
        Ia3Module(torch.randn(16), torch.tensor(0)),
        GloraModule(torch.randn(20, 2), torch.randn(2, 20), torch.randn(16, 2, 1, 1), torch.randn(2, 20, 3, 3), alpha=3.0),
    ],
    ids=["loha", "loha-tucker", "lokr", "lokr-tucker", "lokr-whole-second", "full", "ia3", "glora-conv"],
)  # fmt: skip
def test_a_kind_merged_in_pieces_of_rows_equals_it_merged_whole(module):
    """The streaming merge updates big weights a few rows at a time (`by_rows` kinds): the pieces add up to the whole."""
    assert module.by_rows
    weight = torch.randn(16, 20, 3, 3)
    whole = module.apply(weight.clone(), 0.7).reshape(16, -1)
    pieces = weight.clone().reshape(16, -1)
    for begin, end in ((0, 5), (5, 6), (6, 16)):
        module.apply(pieces[begin:end], 0.7, rows=(begin, end))
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
