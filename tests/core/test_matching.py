"""matching.py and state.py: the one matcher and the one weight-update arithmetic, and that every user shares them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.core.families import SD1, family_of_pipeline
from sdlora.core.formats import ldm
from sdlora.core.formats.single_file import single_file_slot
from sdlora.core.matching import Layer, fit_to_shape, layers_of, match_lora, resolve_module_path
from sdlora.core.state import LoraModule, LoraState
from sdlora.inference import merge
from sdlora.inference.adapters import pipeline_layers
from sdlora.storage.safetensors_stream import read_header


def test_update_is_scale_times_up_at_down_in_fp32():
    generator = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(3, 6, generator=generator), torch.randn(5, 3, generator=generator), alpha=1.5)  # alpha != rank
    weight = torch.randn(5, 6, generator=generator)
    expected = weight.double() + 0.7 * (1.5 / 3) * (module.up.double() @ module.down.double())
    updated = module.add_to(weight.clone(), 0.7)
    torch.testing.assert_close(updated.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.delta(0.7).double(), expected - weight.double(), rtol=1e-6, atol=1e-6)
    conv = LoraModule(torch.randn(2, 4, 3, 3, generator=generator), torch.randn(6, 2, 1, 1, generator=generator), alpha=4.0)
    assert conv.delta().shape == (6, 4, 3, 3)
    with pytest.raises(ValueError, match="contiguous fp32"):
        module.add_to(weight.half())


def test_fit_treats_a_1x1_conv_and_a_linear_as_one_map():
    linear = LoraModule(torch.ones(2, 8), torch.ones(4, 2), 3.0)
    as_conv = fit_to_shape(linear, (4, 8, 1, 1))
    assert as_conv.down.shape == (2, 8, 1, 1) and as_conv.up.shape == (4, 2, 1, 1) and as_conv.alpha == 3.0
    assert fit_to_shape(as_conv, (4, 8)).down.shape == (2, 8)
    assert fit_to_shape(linear, (4, 9)) is None
    assert fit_to_shape(LoraModule(torch.ones(2, 8, 3, 3), torch.ones(4, 2, 1, 1)), (4, 72)) is None  # a 3x3 conv is no Linear


def test_text_encoder_paths_resolve_with_or_without_text_model():
    assert resolve_module_path("text_model.encoder.layers.0.mlp.fc1", {"encoder.layers.0.mlp.fc1"}) == "encoder.layers.0.mlp.fc1"
    assert resolve_module_path("encoder.layers.0.mlp.fc1", {"text_model.encoder.layers.0.mlp.fc1"}) == "text_model.encoder.layers.0.mlp.fc1"
    assert resolve_module_path("encoder.layers.1.mlp.fc1", {"encoder.layers.0.mlp.fc1"}) is None


def test_match_lists_the_unmatched_and_refuses_what_cannot_fit():
    layers = {"unet": {"a.to_q": Layer((4, 8), "Linear"), "a.norm": Layer((8,), "LayerNorm")}}
    state = LoraState(
        {"unet.a.to_q": LoraModule(torch.ones(2, 8), torch.ones(4, 2)), "unet.b.to_q": LoraModule(torch.ones(2, 8), torch.ones(4, 2))}
    )
    match = match_lora(state, layers, "x.safetensors", "the model")
    assert list(match.modules) == ["unet.a.to_q"] and match.unmatched == ["unet.b.to_q"]
    with pytest.raises(ValueError, match="x.safetensors: LoRA module unet.b.to_q matches no weight in the folder"):
        match.require_all("x.safetensors", "the folder")
    with pytest.raises(ValueError, match="module unet.a.norm is a LayerNorm in this model, which LoRA cannot adapt"):
        match_lora(LoraState({"unet.a.norm": LoraModule(torch.ones(2, 8), torch.ones(8, 2))}), layers, "x", "the model")
    with pytest.raises(ValueError, match=r"makes a \[4, 9\] update but weight unet.a.to_q.weight is \[4, 8\].*and this model is the model"):
        match_lora(LoraState({"unet.a.to_q": LoraModule(torch.ones(2, 9), torch.ones(4, 2))}), layers, "x", "the model")


def test_pipeline_folder_and_single_file_layers_match_a_lora_to_the_same_weights(tiny_pipe, tiny_model_dir, lora_state, tmp_path):
    """One matcher, three views of one model: the modules, the folder's weight headers, a single file's LDM names."""
    in_memory = match_lora(lora_state, pipeline_layers(tiny_pipe, family_of_pipeline(tiny_pipe)), "L", "M")
    assert not in_memory.unmatched and len(in_memory.modules) == len(lora_state)
    expected = {p: n for p, (n, _) in in_memory.modules.items() if p.startswith("unet.")}
    unet_file = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    header = read_header(unet_file)
    from_folder = {"unet": {k.removesuffix(".weight"): Layer(i.shape) for k, i in header.tensors.items() if k.endswith(".weight")}}
    unet_only = lora_state.restricted_to("unet")
    assert {p: n for p, (n, _) in match_lora(unet_only, from_folder, "L", "M").modules.items()} == expected
    table = ldm.ldm_unet_table_for_config(json.loads((tiny_model_dir / "unet" / "config.json").read_text()))
    save_file(
        {single_file_slot("unet", k, table, None, {}).key: v for k, v in load_file(unet_file).items()}, str(tmp_path / "model.safetensors")
    )
    single = {"unet": merge._SingleFileLayers(read_header(tmp_path / "model.safetensors"), "unet", SD1, table)}
    assert {p: n for p, (n, _) in match_lora(unet_only, single, "L", "M").modules.items()} == expected


def test_every_merge_path_updates_weights_through_the_one_arithmetic(tiny_pipe, tiny_model_dir, lora_state, tmp_path, monkeypatch):
    updated: list[int] = []
    original = LoraModule.apply
    monkeypatch.setattr(
        LoraModule,
        "apply",
        lambda self, weight, multiplier=1.0, rows=None: updated.append(id(self)) or original(self, weight, multiplier, rows),
    )
    every_module = {id(m) for m in lora_state.modules.values()}
    merge.merge_lora(tiny_pipe, [(lora_state, 0.5)])
    in_memory, updated[:] = set(updated), []
    merge.merge_model(shutil.copytree(tiny_model_dir, tmp_path / "model"), [(lora_state, 0.5)], out_dir=tmp_path / "merged")
    assert in_memory == set(updated) == every_module  # in memory and streamed, every update went through the kind's `apply`
    assert all(isinstance(layer, Layer) for layer in layers_of(tiny_pipe.unet).values())


def test_a_weight_merged_in_pieces_equals_it_merged_whole(monkeypatch):
    """Pieces of rows (to stay in cache) and OpenCLIP row slices give exactly the whole-tensor update."""
    generator = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(3, 40, generator=generator), torch.randn(96, 3, generator=generator), alpha=1.5)
    weight = torch.randn(96, 40, generator=generator).half()
    whole = module.add_to(weight.float().contiguous(), 0.7).half()
    monkeypatch.setattr(merge, "_PIECE_BYTES", 4 * 40 * 7)  # 7 rows a piece: pieces end inside no boundary of 96
    pieces = merge._merged(weight.clone(), [merge._Update("m", module, 0.7, merge.WeightSlot("w"))], torch.float16, "w", merge.MergeStats())
    assert torch.equal(pieces, whole)
    fused = torch.randn(3 * 32, 40, generator=generator)  # q, k, v rows; the update lands on k's
    k_rows = LoraModule(module.down, module.up[:32], 1.5)
    merged = merge._merged(
        fused.clone(), [merge._Update("k", k_rows, 1.0, merge.WeightSlot("in_proj", rows=(32, 64)))], torch.float32, "w", merge.MergeStats()
    )
    assert torch.equal(merged[:32], fused[:32]) and torch.equal(merged[64:], fused[64:])
    torch.testing.assert_close(merged[32:64], k_rows.add_to(fused[32:64].clone(), 1.0))  # addmm rounding: 1 ulp
