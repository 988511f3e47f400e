"""SD3 LoRA files in use: `load_lora` / `generate` with the SD3 pipeline (the image diffusers' own loader gives; a T5
LoRA merged in memory and unloaded exactly), the folder merge against diffusers' `fuse_lora`, `inspect`, and the
refusals: another family's LoRA, a sampler of another kind, an SD3 single file, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.core.files import write_diffusers, write_kohya
from sdlora.core.state import LoraModule, LoraState
from sdlora.errors import UserError
from sdlora.inference.adapters import load_lora, unload_loras
from sdlora.inference.generation import generate
from sdlora.inference.merge import merge_model
from sdlora.models.loading import load_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


@pytest.fixture
def sd3_lora(tiny_sd3_pipe, every_linear_lora) -> LoraState:
    """Every Linear/Conv2d of the tiny SD3 model, T5 included, small enough to leave the images finite."""
    state = every_linear_lora(tiny_sd3_pipe, seed=1)
    return LoraState({path: LoraModule(m.down, m.up * 0.05, m.alpha) for path, m in state.modules.items()})


def _without_t5(state: LoraState) -> LoraState:
    return LoraState({path: m for path, m in state.modules.items() if not path.startswith("text_encoder_3.")})


def _image(pipe) -> np.ndarray:
    return np.asarray(generate(pipe, "a photo of a red cat", steps=2, seed=5, height=64, width=64, progress=False)[0], dtype=float)


def test_load_lora_gives_the_image_of_diffusers_own_loader(tmp_path, tiny_sd3_pipe, sd3_lora):
    """Our kohya file through `load_lora`, and our diffusers file through diffusers' `load_lora_weights`, draw the
    same image, which is not the base model's."""
    from sdlora.models.tiny import build_tiny_sd3_pipeline

    kohya, diffusers = tmp_path / "ours.safetensors", tmp_path / "pytorch_lora_weights.safetensors"
    write_kohya(_without_t5(sd3_lora), kohya)
    write_diffusers(_without_t5(sd3_lora), diffusers)
    base = _image(tiny_sd3_pipe)
    load_lora(tiny_sd3_pipe, kohya)
    ours = _image(tiny_sd3_pipe)
    reference = build_tiny_sd3_pipeline()
    reference.load_lora_weights(str(tmp_path), weight_name=diffusers.name)
    theirs = _image(reference)
    assert np.abs(ours - base).mean() > 5  # the LoRA changes the picture (0-255 scale)
    assert np.abs(ours - theirs).max() <= 1  # one step of PNG rounding at most


def test_a_t5_lora_is_merged_in_memory_and_unloaded_exactly(tmp_path, tiny_sd3_pipe, sd3_lora):
    """diffusers' SD3 loader takes no T5 LoRA: its modules are merged into the weights, the originals kept."""
    kohya = tmp_path / "with_t5.safetensors"
    write_kohya(sd3_lora, kohya)
    t5 = tiny_sd3_pipe.text_encoder_3
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    load_lora(tiny_sd3_pipe, kohya, scale=0.5)
    for path, module in sd3_lora.for_component("text_encoder_3").items():
        torch.testing.assert_close(t5.state_dict()[path + ".weight"], before[path + ".weight"] + 0.5 * module.delta(), rtol=1e-5, atol=1e-6)
    unload_loras(tiny_sd3_pipe)
    assert all(torch.equal(t5.state_dict()[k], before[k]) for k in before)


def test_flow_matching_takes_euler_only(tiny_sd3_pipe):
    image = generate(tiny_sd3_pipe, "a cat", steps=1, seed=0, height=64, width=64, progress=False, sampler="Euler")[0]
    assert "Sampler: Euler," in image.info["parameters"] and type(tiny_sd3_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(
        UserError, match=r"samples by flow matching \(FlowMatchEulerDiscreteScheduler\), which sampler 'DPM\+\+ 2M Karras' cannot"
    ):
        generate(tiny_sd3_pipe, "a cat", steps=1, seed=0, sampler="DPM++ 2M Karras", progress=False)


def test_folder_merge_equals_diffusers_fuse_lora(tmp_path, tiny_sd3_dir, sd3_lora):
    """`sdlora merge` into the tiny SD3 folder (transformer and both CLIPs) against diffusers' load_lora_weights +
    fuse_lora of the same file at the same scale; the T5 modules (kohya file) merged exactly too."""
    diffusers, kohya = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors"
    write_diffusers(_without_t5(sd3_lora), diffusers)
    write_kohya(sd3_lora, kohya)
    merged = load_pipeline(str(merge_model(tiny_sd3_dir, [(diffusers, 0.7)], tmp_path / "merged")))
    reference = load_pipeline(str(tiny_sd3_dir))
    reference.load_lora_weights(str(tmp_path), weight_name=diffusers.name, adapter_name="a")
    reference.set_adapters(["a"], [0.7])
    reference.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"], adapter_names=["a"])
    reference.unload_lora_weights()
    base = load_pipeline(str(tiny_sd3_dir))
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        ours, theirs, original = (getattr(p, component).state_dict() for p in (merged, reference, base))
        changed = [key for key in original if not torch.equal(theirs[key], original[key])]
        assert len(changed) == len(sd3_lora.for_component(component)), component
        for key in original:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=key)
    with_t5 = load_pipeline(str(merge_model(tiny_sd3_dir, [(kohya, 0.7)], tmp_path / "merged-t5")))
    for path, module in sd3_lora.for_component("text_encoder_3").items():
        key = path + ".weight"
        expected = base.text_encoder_3.state_dict()[key] + 0.7 * module.delta()
        torch.testing.assert_close(with_t5.text_encoder_3.state_dict()[key], expected, rtol=1e-5, atol=1e-6)


def test_another_familys_lora_is_one_line_naming_both(tmp_path, tiny_sd3_pipe, tiny_pipe, sd3_lora, random_lora_state, tiny_sdxl_pipe):
    sd3_file, sdxl_file = tmp_path / "sd3.safetensors", tmp_path / "sdxl.safetensors"
    write_kohya(sd3_lora, sd3_file)
    write_kohya(random_lora_state(tiny_sdxl_pipe), sdxl_file)
    with pytest.raises(UserError, match=r"has modules for transformer, which SD1.x models do not have; it was made for SD3") as raised:
        load_lora(tiny_pipe, sd3_file)
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match=r"has modules for unet, which SD3 models do not have; it was made for SDXL.*this model is SD3"):
        load_lora(tiny_sd3_pipe, sdxl_file)


def test_merge_refusals_are_one_line(tmp_path, tiny_model_dir, sd3_lora, capsys):
    lora = tmp_path / "sd3.safetensors"
    write_kohya(sd3_lora, lora)
    single = tmp_path / "sd3_medium.safetensors"  # an MMDiT without its text encoders, and a LoRA of them too
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(120, 40)}, str(single))
    assert main(["merge", "--model", str(single), "--lora", str(lora), "--single-file", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no text_encoder (text_encoders.clip_l.transformer.* keys)" in err and "\n" not in err
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", str(lora), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has modules for transformer, which SD1.x models do not have; it was made for SD3" in err and "\n" not in err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.safetensors").exists()


def test_single_file_merge_equals_the_folder_merge_and_unmerges(tmp_path, tiny_sd3_dir, sd3_lora, write_sd3_single_file, capsys):
    """Our kohya file (fused qkv, (shift, scale) norms) merged into SAI's single file (MMDiT, CLIP-L, CLIP-G, T5):
    diffusers' own `from_single_file` reads back the transformer of the folder merge, the text encoders' tensors equal
    the folder merge's, every tensor no module touches is byte-identical, and unmerge gives the model back."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    kohya = tmp_path / "kohya.safetensors"
    write_kohya(sd3_lora, kohya)
    single = write_sd3_single_file(tiny_sd3_dir, tmp_path / "sd3_tiny.safetensors")
    merged_file = tmp_path / "merged.safetensors"
    argv = ["merge", "--model", str(single), "--lora", f"{kohya}:0.7", "--single-file", str(merged_file)]
    assert main(argv) == 0, capsys.readouterr().err
    folder = load_pipeline(str(merge_model(tiny_sd3_dir, [(kohya, 0.7)], tmp_path / "merged")))
    ours = SD3Transformer2DModel.from_single_file(str(merged_file), config=str(tiny_sd3_dir), subfolder="transformer").state_dict()
    for key, value in folder.transformer.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    source, merged = load_file(single), load_file(merged_file)
    for component, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        for key, value in getattr(folder, component).state_dict().items():
            clip = name != "t5xxl" and not key.startswith(("text_model.", "text_projection"))
            stored = f"text_encoders.{name}.transformer.{'text_model.' if clip else ''}{key}"
            if stored in merged:  # position_ids and tied T5 embeddings are not stored twice
                torch.testing.assert_close(merged[stored], value, rtol=1e-5, atol=1e-6, msg=stored)
    changed = {key for key in source if not torch.equal(source[key], merged[key])}
    untouched = set(source) - changed
    assert any(key.startswith("first_stage_model.") for key in untouched) and "model.diffusion_model.pos_embed" in untouched
    assert all(not key.endswith("bias") for key in changed)  # a LoRA changes weights only
    # the final layer's norm and the last block's context norm: the swapped halves land where diffusers reads them
    assert {
        "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
        "model.diffusion_model.joint_blocks.2.context_block.adaLN_modulation.1.weight",
    } <= changed
    restored = merge_model(merged_file, [(kohya, 0.7)], single_file=tmp_path / "restored.safetensors", unmerge=True)
    for key, value in load_file(restored).items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=1e-5, msg=key)


def test_single_file_without_text_encoders_takes_a_transformer_lora(tmp_path, tiny_sd3_dir, sd3_lora, write_sd3_single_file):
    """SAI's MMDiT-only file (`sd3.5_medium.safetensors` without clips): the transformer's modules merge; a LoRA with
    text-encoder modules is one line saying which encoder the file lacks."""
    from safetensors.torch import load_file

    single = write_sd3_single_file(tiny_sd3_dir, tmp_path / "mmdit_only.safetensors", text_encoders=False)
    transformer_only = sd3_lora.restricted_to("transformer")
    out = merge_model(single, [(transformer_only, 1.0)], single_file=tmp_path / "merged.safetensors")
    source, merged = load_file(single), load_file(out)
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    q, k, v = (sd3_lora.modules[f"transformer.transformer_blocks.0.attn.{name}"].delta() for name in ("to_q", "to_k", "to_v"))
    torch.testing.assert_close(merged[qkv], source[qkv] + torch.cat([q, k, v]), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match=r"has no text_encoder \(text_encoders\.clip_l\.transformer\.\* keys\)"):
        merge_model(single, [(sd3_lora, 1.0)], single_file=tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()


def test_inspect_shows_an_sd3_file(tmp_path, sd3_lora, capsys):
    lora = tmp_path / "sd3.safetensors"
    write_kohya(sd3_lora, lora)
    assert main(["inspect", "--json", str(lora)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "SD3" and info["format"] == "kohya"
    assert info["layer_kinds"] == {"linear": len(sd3_lora) - 1, "conv2x2": 1}  # the patch embedding is a 2x2 conv


def test_extracting_from_sd3_models_is_refused_in_one_line(tmp_path, capsys):
    assert main(["extract", "--base", "tiny-sd3", "--tuned", "tiny-sd3", "--out", str(tmp_path / "x.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tiny-sd3 is an SD3 model, which it cannot read yet" in err and "\n" not in err
    assert not (tmp_path / "x.safetensors").exists()
