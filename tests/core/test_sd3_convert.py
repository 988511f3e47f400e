"""`sdlora convert` between diffusers' and kohya's SD3 files, both ways, exact; our diffusers file (written or
converted) loaded by diffusers' own `StableDiffusion3Pipeline.load_lora_weights` changes each layer by our update."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.core.files import read_lora, write_diffusers, write_kohya
from sdlora.core.state import LoraState


@pytest.fixture
def sd3_lora(tiny_sd3_pipe, every_linear_lora) -> LoraState:
    """Every Linear/Conv2d of the tiny SD3 transformer and both CLIPs (diffusers' SD3 files hold no T5), rank 3, alpha 5."""
    state = every_linear_lora(tiny_sd3_pipe)
    return LoraState({path: module for path, module in state.modules.items() if not path.startswith("text_encoder_3.")})


def assert_same_updates(read: LoraState, expected: LoraState) -> None:
    assert read.modules.keys() == expected.modules.keys()
    for path, module in expected.modules.items():
        torch.testing.assert_close(read.modules[path].delta(), module.delta(), rtol=1e-5, atol=1e-6, msg=path)


def test_convert_round_trips_both_ways(tmp_path, sd3_lora, capsys):
    kohya, diffusers = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    write_kohya(sd3_lora, kohya)
    write_diffusers(sd3_lora, diffusers)
    assert main(["convert", str(kohya), str(tmp_path / "k2d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "k2d.safetensors"), str(tmp_path / "k2d2k.safetensors"), "--to", "kohya"]) == 0
    assert main(["convert", str(diffusers), str(tmp_path / "d2k.safetensors"), "--to", "kohya"]) == 0
    assert "wrote 113 modules as kohya" in capsys.readouterr().out
    # kohya -> diffusers -> kohya gives back the very tensors (the fused qkv included); diffusers -> kohya is ours
    first, again = load_file(kohya), load_file(tmp_path / "k2d2k.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    assert_same_updates(read_lora(tmp_path / "k2d.safetensors"), sd3_lora)
    d2k = load_file(tmp_path / "d2k.safetensors")
    assert d2k.keys() == first.keys() and all(torch.equal(first[key], d2k[key]) for key in first)
    assert read_lora(tmp_path / "d2k.safetensors").metadata["ss_base_model_version"] == "medium"


def _diffusers_updates(pipe, lora_file) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change when diffusers loads `lora_file` into `pipe` and fuses it at scale 1."""
    components = ("transformer", "text_encoder", "text_encoder_2")
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components}
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="ours")
    pipe.fuse_lora(components=list(components), lora_scale=1.0)
    pipe.unload_lora_weights()
    updates = {}
    for component in components:
        for key, value in getattr(pipe, component).state_dict().items():
            if key.endswith(".weight") and key in before[component] and not torch.equal(value, before[component][key]):
                path = key.removesuffix(".weight")
                if component != "transformer" and not path.startswith(("text_model.", "text_projection")):
                    path = "text_model." + path  # transformers 5 has no text_model. level in CLIPTextModel's tree
                updates[f"{component}.{path}"] = value - before[component][key]
    return updates


@pytest.mark.parametrize("written_as", ["diffusers", "kohya"])
def test_diffusers_loads_our_file_with_our_update(tmp_path, tiny_sd3_pipe, sd3_lora, written_as):
    """Our diffusers file, or our kohya file converted by `sdlora convert --to diffusers`: diffusers' own loader and
    fuse change every layer by our module's update."""
    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    if written_as == "diffusers":
        write_diffusers(sd3_lora, lora_file)
    else:
        write_kohya(sd3_lora, tmp_path / "kohya.safetensors")
        assert main(["convert", str(tmp_path / "kohya.safetensors"), str(lora_file), "--to", "diffusers"]) == 0
    updates = _diffusers_updates(tiny_sd3_pipe, lora_file)
    assert updates.keys() == sd3_lora.modules.keys()
    for path, module in sd3_lora.modules.items():
        torch.testing.assert_close(updates[path], module.delta().reshape(updates[path].shape), rtol=1e-4, atol=1e-6, msg=path)


def test_a_t5_lora_cannot_be_written_as_diffusers(tmp_path, tiny_sd3_pipe, every_linear_lora, capsys):
    kohya = tmp_path / "kohya.safetensors"
    write_kohya(every_linear_lora(tiny_sd3_pipe), kohya)
    assert main(["convert", str(kohya), str(tmp_path / "out.safetensors"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot hold text_encoder_3 modules" in err and "write it as kohya" in err and "\n" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_qkv_not_in_thirds_is_one_line_and_no_file(tmp_path, sd3_lora, capsys):
    kohya = tmp_path / "kohya.safetensors"
    write_kohya(sd3_lora, kohya)
    tensors = load_file(kohya)
    name = "lora_unet_joint_blocks_1_context_block_attn_qkv"
    tensors[name + ".lora_up.weight"] = tensors[name + ".lora_up.weight"][:-1]  # 119 rows
    save_file(tensors, str(kohya))
    assert main(["convert", str(kohya), str(tmp_path / "out.safetensors"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"LoRA module '{name}' is SD3's fused qkv, but its up factor has 119 rows, not three equal q/k/v parts" in err
    assert "\n" not in err and not (tmp_path / "out.safetensors").exists()


def test_combine_and_resize_work_on_sd3_files(tmp_path, sd3_lora):
    """Through the canonical form: combine joins two SD3 kohya files exactly (the fused qkv too); resize to the rank
    the modules already have changes no update."""
    kohya = tmp_path / "kohya.safetensors"
    write_kohya(sd3_lora, kohya)
    assert main(["combine", f"{kohya}:0.5", f"{kohya}:0.25", "--out", str(tmp_path / "combined.safetensors")]) == 0
    combined = read_lora(tmp_path / "combined.safetensors")
    assert combined.modules.keys() == sd3_lora.modules.keys()
    for path, module in sd3_lora.modules.items():
        torch.testing.assert_close(combined.modules[path].delta(), 0.75 * module.delta(), rtol=1e-5, atol=1e-6, msg=path)
    assert main(["resize", str(kohya), "--rank", "3", "--out", str(tmp_path / "resized.safetensors")]) == 0
    assert_same_updates(read_lora(tmp_path / "resized.safetensors"), sd3_lora)
