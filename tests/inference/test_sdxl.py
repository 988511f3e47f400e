"""SDXL LoRAs in use: loading (ours against diffusers' own loader), generating, merging into folders and into
single-file checkpoints (OpenCLIP's fused q/k/v and transposed projection), and the refusals between families."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.core.files import read_lora, write_diffusers, write_kohya, write_lora
from sdlora.core.state import LoraModule, LoraState
from sdlora.core.version import __version__
from sdlora.inference.adapters import load_lora, unload_loras
from sdlora.inference.merge import merge_lora, merge_model
from sdlora.models.loading import load_pipeline
from sdlora.storage.output_rules import WRITTEN_BY_KEY
from sdlora.storage.safetensors_stream import read_header

TE2_PREFIX = "conditioner.embedders.1.model."


def _sdxl_lora(random_lora_state, pipe, alpha: float = 8.0, seed: int = 1) -> LoraState:
    """Rank 4 (alpha 8 by default) on the UNet's attention, both text encoders' attention, and TE2's projection."""
    state = random_lora_state(pipe, rank=4, alpha=alpha, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    projection = pipe.text_encoder_2.text_projection  # square (48 x 48): a transposition mistake would not fail on shape
    state.modules["text_encoder_2.text_projection"] = LoraModule(
        torch.randn(4, projection.in_features, generator=generator) * 0.1,
        torch.randn(projection.out_features, 4, generator=generator) * 0.1,
        alpha,
    )
    assert set(state.components()) == {"unet", "text_encoder", "text_encoder_2"}
    return state


def _image(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images[0]


def _updates_in(pipe) -> dict[str, torch.Tensor]:
    """Every peft LoRA layer's update (scaling * B @ A) by `component.module`, as diffusers loaded it."""
    from peft.tuners.lora import LoraLayer

    updates = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.lora_A:
                    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                    delta = (b.flatten(1) @ a.flatten(1)) * layer.scaling[adapter]
                    path = name if component == "unet" or name.startswith(("text_model.", "text_projection")) else "text_model." + name
                    updates[f"{component}.{path}"] = delta
    return updates


@pytest.mark.parametrize("writer", [write_diffusers, write_kohya], ids=["diffusers", "kohya"])
def test_diffusers_own_loader_reads_our_files_as_we_do(tmp_path, random_lora_state, tiny_sdxl_pipe, writer):
    state = _sdxl_lora(random_lora_state, tiny_sdxl_pipe)
    path = writer(state, tmp_path / "lora.safetensors")
    reference = load_pipeline("tiny-sdxl")
    reference.load_lora_weights(str(path))
    loaded = _updates_in(reference)
    assert set(loaded) == set(state.modules)  # all three components, nothing dropped
    for module_path, module in state.modules.items():
        torch.testing.assert_close(
            loaded[module_path].reshape(module.weight_shape()), module.delta(), rtol=1e-5, atol=1e-7, msg=module_path
        )
    ours = load_pipeline("tiny-sdxl")
    load_lora(ours, path)
    np.testing.assert_allclose(_image(ours), _image(reference), rtol=0, atol=1e-5)
    unload_loras(ours)
    assert not np.allclose(_image(ours), _image(reference), atol=1e-4)  # the LoRA does change the image


def test_kohya_documented_sdxl_keys_read_into_the_same_state():
    """Keys spelled as kohya's sd-scripts write SDXL LoRAs: LDM UNet names, lora_te1_ and lora_te2_."""
    down, up = torch.ones(4, 640), torch.ones(640, 4)
    keys = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_0_proj": "unet.up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_input_blocks_7_0_in_layers_2": "unet.down_blocks.2.resnets.0.conv1",
        "lora_te1_text_model_encoder_layers_11_self_attn_q_proj": "text_encoder.text_model.encoder.layers.11.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2": "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
    }
    tensors = {}
    for key in keys:
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    from sdlora.core.formats import to_lora_state

    state = to_lora_state(tensors)
    assert sorted(state.modules) == sorted(keys.values()) and state.alphas() == [2.0]


def test_folder_merge_equals_diffusers_fuse_lora(tmp_path, random_lora_state, tiny_sdxl_pipe, tiny_sdxl_dir):
    state = _sdxl_lora(random_lora_state, tiny_sdxl_pipe)
    path = write_diffusers(state, tmp_path / "lora.safetensors")
    merged = merge_model(tiny_sdxl_dir, [(path, 0.8)], out_dir=tmp_path / "merged")
    reference = load_pipeline(str(tiny_sdxl_dir))
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=0.8)
    reference.unload_lora_weights()
    for component, file in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")):
        ours = load_file(merged / component / f"{file}.safetensors")
        theirs = getattr(reference, component).state_dict()
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-6, msg=f"{component}.{key}")
    base = load_file(tiny_sdxl_dir / "text_encoder_2" / "model.safetensors")
    assert not torch.equal(
        base["text_projection.weight"], load_file(merged / "text_encoder_2" / "model.safetensors")["text_projection.weight"]
    )


def _diffusers_reads_single_file(path, config_dir) -> dict[str, dict[str, torch.Tensor]]:
    """A single file's UNet and text encoders as diffusers' own single-file code converts them."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    checkpoint = load_file(path)
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config_dir), subfolder="unet")
    te1 = convert_ldm_clip_checkpoint(checkpoint, remove_prefix="conditioner.embedders.0.transformer.")
    te2_model = CLIPTextModelWithProjection.from_pretrained(config_dir / "text_encoder_2")
    te2 = convert_open_clip_checkpoint(te2_model, checkpoint, prefix=TE2_PREFIX)
    return {"unet": unet.state_dict(), "text_encoder": te1, "text_encoder_2": te2}


def _folder_weights(folder) -> dict[str, dict[str, torch.Tensor]]:
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
        "text_encoder_2": "text_encoder_2/model.safetensors",
    }
    weights = {component: load_file(folder / file) for component, file in files.items()}
    # the single file's encoders are converted with the `text_model.` level; transformers 5 saves CLIPTextModel without it
    weights["text_encoder"] = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in weights["text_encoder"].items()}
    return weights


def test_our_single_file_reads_back_through_diffusers_as_the_folder(tmp_path, tiny_sdxl_dir, write_sdxl_single_file):
    """The hand-built single file is what diffusers' converters expect: the test below rests on it."""
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "model.safetensors")
    converted, folder = _diffusers_reads_single_file(checkpoint, tiny_sdxl_dir), _folder_weights(tiny_sdxl_dir)
    for component in folder:
        for key, value in folder[component].items():
            if not key.endswith("position_ids"):
                assert torch.equal(converted[component][key], value), f"{component}.{key}"


def _merged_both_ways(loras, checkpoint, model_dir, tmp_path):
    """(single file, folder, the single file's weights as diffusers reads them, the folder's): both merges of `loras`."""
    folder = merge_model(model_dir, loras, out_dir=tmp_path / "merged")
    single = merge_model(checkpoint, loras, single_file=tmp_path / "merged.safetensors")
    converted, expected = _diffusers_reads_single_file(single, model_dir), _folder_weights(folder)
    for component in expected:  # the encoders' position_ids are buffers diffusers' converter makes anew
        for key in [k for k in expected[component] if k.endswith("position_ids")]:
            del expected[component][key]
    return single, folder, converted, expected


def test_single_file_merge_equals_the_folder_merge_and_touches_only_what_it_updates(
    tmp_path, random_lora_state, tiny_sdxl_pipe, tiny_sdxl_dir, write_sdxl_single_file
):
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "model.safetensors")
    loras = [(_sdxl_lora(random_lora_state, tiny_sdxl_pipe), 0.7)]
    single, _, converted, expected = _merged_both_ways(loras, checkpoint, tiny_sdxl_dir, tmp_path)
    for component in expected:
        for key, value in expected[component].items():
            assert torch.equal(converted[component][key], value), f"{component}.{key}"
    before, after = read_header(checkpoint), read_header(single)
    assert before.metadata == {"format": "pt", "note": "kept"} and after.metadata == {**before.metadata, WRITTEN_BY_KEY: __version__}
    raw_before, raw_after = checkpoint.read_bytes(), single.read_bytes()
    changed = [
        k
        for k, info in before.tensors.items()
        if raw_before[info.begin : info.end] != raw_after[after.tensors[k].begin : after.tensors[k].end]
    ]
    adapted_keys = {k for k in changed}
    assert TE2_PREFIX + "text_projection" in adapted_keys and TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in adapted_keys
    assert not any("first_stage_model" in k or "in_proj_bias" in k or "mlp" in k for k in changed)  # untouched: byte-identical


def test_a_q_only_lora_leaves_k_and_v_rows_of_in_proj_byte_identical(tmp_path, tiny_sdxl_dir, write_sdxl_single_file):
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    state = LoraState(
        {
            "text_encoder_2.text_model.encoder.layers.2.self_attn.q_proj": LoraModule(
                torch.randn(2, 48, generator=generator), torch.randn(48, 2, generator=generator), 3.0
            )
        }
    )
    merged = merge_model(checkpoint, [(state, 1.0)], single_file=tmp_path / "merged.safetensors")
    key = TE2_PREFIX + "transformer.resblocks.2.attn.in_proj_weight"
    before, after = load_file(checkpoint)[key], load_file(merged)[key]
    assert before.shape == (3 * 48, 48)
    assert torch.equal(before[48:].view(torch.int32), after[48:].view(torch.int32))  # k and v rows, bit for bit
    torch.testing.assert_close(
        after[:48] - before[:48], state.modules["text_encoder_2.text_model.encoder.layers.2.self_attn.q_proj"].delta(), rtol=1e-5, atol=1e-6
    )


def test_unmerge_restores_the_fp32_weights(tmp_path, random_lora_state, tiny_sdxl_pipe, tiny_sdxl_dir, write_sdxl_single_file):
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "model.safetensors")
    state = _sdxl_lora(random_lora_state, tiny_sdxl_pipe)
    merged = merge_model(checkpoint, [(state, 0.9)], single_file=tmp_path / "merged.safetensors")
    restored = merge_model(merged, [(state, -0.9)], single_file=tmp_path / "restored.safetensors")
    original, back = load_file(checkpoint), load_file(restored)
    assert max((back[k] - v).abs().max().item() for k, v in original.items() if v.is_floating_point()) < 1e-6


def test_merge_into_a_pipeline_in_memory_changes_the_image_as_loading_does(random_lora_state, tiny_sdxl_pipe):
    state = _sdxl_lora(random_lora_state, tiny_sdxl_pipe)
    loaded = load_pipeline("tiny-sdxl")
    load_lora(loaded, state, scale=0.6)
    merged = load_pipeline("tiny-sdxl")
    assert merge_lora(merged, [(state, 0.6)]) == len(state)
    np.testing.assert_allclose(_image(merged), _image(loaded), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- one family's LoRA into another's model


def test_an_sd1_lora_into_sdxl_and_an_sdxl_lora_into_sd1_are_errors_naming_both(
    tmp_path, random_lora_state, tiny_pipe, tiny_sdxl_pipe, tiny_model_dir, tiny_sdxl_dir
):
    sd1 = random_lora_state(tiny_pipe, text_encoder=False)
    sdxl = _sdxl_lora(random_lora_state, tiny_sdxl_pipe)
    with pytest.raises(ValueError, match=r"made for .*cross-attention width 32.*and this model is .*cross-attention width 80"):
        load_lora(tiny_sdxl_pipe, sd1)
    with pytest.raises(ValueError, match="text_encoder_2, which SD1.x models do not have; it was made for SDXL"):
        load_lora(tiny_pipe, sdxl)
    with pytest.raises(ValueError, match=r"makes a \[\d+, 32\] update but weight .* is \[\d+, 80\]"):
        merge_model(tiny_sdxl_dir, [(sd1, 1.0)], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="text_encoder_2"):
        merge_model(tiny_model_dir, [(sdxl, 1.0)], out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow  # interpreter starts
def test_cli_refuses_the_other_familys_lora_in_one_line(
    tmp_path, random_lora_state, tiny_pipe, tiny_sdxl_pipe, tiny_model_dir, tiny_sdxl_dir, capsys
):
    sd1_file = write_kohya(random_lora_state(tiny_pipe, text_encoder=False), tmp_path / "sd1.safetensors")
    sdxl_file = write_kohya(_sdxl_lora(random_lora_state, tiny_sdxl_pipe), tmp_path / "sdxl.safetensors")
    cases = [
        [
            "generate",
            "--model",
            str(tiny_sdxl_dir),
            "--lora",
            str(sd1_file),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "g1"),
        ],
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--lora",
            str(sdxl_file),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "g2"),
        ],
        ["merge", "--model", str(tiny_sdxl_dir), "--lora", str(sd1_file), "--out", str(tmp_path / "m1")],
        ["merge", "--model", str(tiny_model_dir), "--lora", str(sdxl_file), "--out", str(tmp_path / "m2")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        stderr = capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if "error" in line]  # the rest is diffusers' loading progress
        assert len(errors) == 1 and errors[0].startswith(f"sdlora {argv[0]}: error: ") and "Traceback" not in stderr, stderr
        assert "SD1.x" in errors[0] or "SDXL" in errors[0] or "width 80" in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd1.safetensors", "sdxl.safetensors"]


def test_a_single_file_missing_its_second_text_encoder_is_one_line(
    tmp_path, tiny_sdxl_dir, write_sdxl_single_file, random_lora_state, tiny_sdxl_pipe, capsys
):
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "no-te2.safetensors", text_encoder_2=False)
    with pytest.raises(ValueError, match=r"no-te2.safetensors has no text_encoder_2 \(conditioner.embedders.1.model.\* keys\)"):
        load_pipeline(str(checkpoint))
    lora = write_kohya(_sdxl_lora(random_lora_state, tiny_sdxl_pipe), tmp_path / "xl.safetensors")
    assert main(["merge", "--model", str(checkpoint), "--lora", str(lora), "--single-file", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text_encoder_2" in err[0] and "has no text_encoder_2" in err[0], err
    assert not (tmp_path / "out.safetensors").exists()


def test_generate_makes_sdxl_images_with_a1111_parameters(tmp_path, random_lora_state, tiny_sdxl_pipe):
    lora = write_kohya(_sdxl_lora(random_lora_state, tiny_sdxl_pipe), tmp_path / "xlstyle.safetensors")
    out = tmp_path / "images"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sdxl",
                "--lora",
                f"{lora}:0.5",
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--seed",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from sdlora.inference.generation import read_parameters

    parameters = read_parameters(out / "00000-4.png")
    assert "<lora:xlstyle:0.5>" in parameters and "Sampler: Euler" in parameters and "Size: 64x64" in parameters
    state = read_lora(lora)
    assert state.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(state.metadata["ss_network_args"]) == {}
    shutil.rmtree(out)


def _every_kind(pipe) -> LoraState:
    """One module of each adapter kind, on SDXL's awkward spots: the second encoder's q_proj (a row slice of
    OpenCLIP's fused in_proj_weight in a single file), its text_projection (stored transposed there), UNet layers."""
    from sdlora.core.kinds import DoraModule, FullModule, GloraModule, Ia3Module, LohaModule, LokrModule, OftModule

    generator = torch.Generator().manual_seed(9)

    def rand(*shape):
        return torch.randn(shape, generator=generator) * 0.1

    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn"
    unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    out, width = pipe.unet.get_submodule(unet.removeprefix("unet.") + ".attn1.to_q").weight.shape
    return LoraState({
        f"{te2}.q_proj": OftModule(rand(6, 8, 8), 1 + rand(48, 1), 0.0),
        f"{te2}.k_proj": LohaModule(rand(48, 2), rand(2, 48), rand(48, 2), rand(2, 48), alpha=1.0),
        f"{te2}.v_proj": GloraModule(rand(48, 2), rand(2, 48), rand(48, 2), rand(2, 48), alpha=3.0),
        "text_encoder_2.text_projection": DoraModule(LoraModule(rand(2, 48), rand(48, 2), 1.0), torch.rand(48, 1) + 0.5),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": Ia3Module(rand(32), torch.tensor(1)),
        f"{unet}.attn1.to_q": LokrModule(w1=rand(2, 2), w2a=rand(out // 2, 2), w2b=rand(2, width // 2), alpha=1.0),
        f"{unet}.attn1.to_k": FullModule(rand(out, width)),
    })  # fmt: skip


def test_every_kind_merges_into_a_single_file_as_into_the_folder_and_in_memory(
    tmp_path, tiny_sdxl_pipe, tiny_sdxl_dir, write_sdxl_single_file
):
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "model.safetensors")
    loras = [(_every_kind(tiny_sdxl_pipe), 0.7)]
    _, folder, converted, expected = _merged_both_ways(loras, checkpoint, tiny_sdxl_dir, tmp_path)
    for component in expected:
        for key, value in expected[component].items():
            torch.testing.assert_close(converted[component][key], value, rtol=1e-6, atol=1e-7, msg=f"{component}.{key}")
    merge_lora(tiny_sdxl_pipe, loras)
    for component, file in (("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        ours = load_file(folder / component / f"{file}.safetensors")
        in_memory = getattr(tiny_sdxl_pipe, component).state_dict()
        assert all(torch.equal(ours[k], in_memory[k]) for k in ours if not k.endswith("position_ids")), component
    base = load_file(tiny_sdxl_dir / "text_encoder_2" / "model.safetensors")
    merged_te2 = load_file(folder / "text_encoder_2" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged_te2[k])}
    assert {"text_projection.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight"} <= changed, changed


def test_a_single_file_whose_header_lies_is_refused_before_anything_is_written(
    tmp_path, random_lora_state, tiny_sdxl_pipe, tiny_sdxl_dir, write_sdxl_single_file, capsys
):
    """An untouched tensor's data_offsets overlapping the next: copied as bytes, it made a file safetensors refuses."""
    checkpoint = write_sdxl_single_file(tiny_sdxl_dir, tmp_path / "model.safetensors")
    raw = checkpoint.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    vae = sorted((k for k in header if k.startswith("first_stage_model.")), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[vae[1]]["data_offsets"]
    header[vae[1]]["data_offsets"] = [begin - 4, end - 4]  # overlaps the tensor before it, the same size
    text = json.dumps(header).encode()
    checkpoint.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    lora = write_lora(_sdxl_lora(random_lora_state, tiny_sdxl_pipe), tmp_path / "lora.safetensors", "kohya")
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(checkpoint), "--lora", str(lora), "--single-file", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overlap" in err and str(checkpoint) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "model.safetensors"]
