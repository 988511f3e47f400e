"""merge.py (and safetensors_stream.py): merged weights against diffusers' fuse_lora, byte-exact copies, unmerge,
conv LoRA, dtypes, single-file checkpoints, refusals and the merge/unmerge CLI."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.core.families import SD1
from sdlora.core.files import write_lora
from sdlora.core.formats import ldm
from sdlora.core.formats.single_file import single_file_slot
from sdlora.core.state import LoraModule, LoraState
from sdlora.core.version import __version__
from sdlora.inference.merge import MergeStats, merge_lora, merge_model, parse_lora_arg
from sdlora.models import loading as models
from sdlora.storage import safetensors_stream
from sdlora.storage.output_rules import MARKER_FILE
from sdlora.storage.safetensors_stream import read_header

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TE_FILE = "text_encoder/model.safetensors"


@pytest.fixture
def two_loras(tiny_pipe, random_lora_state):
    """Rank 4/alpha 8 on attention, proj_in (1x1 conv), resnet conv1 (3x3) and the text encoder; rank 3/alpha 5 elsewhere."""
    first = random_lora_state(tiny_pipe, rank=4, alpha=8.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"), seed=1)
    second = random_lora_state(tiny_pipe, rank=3, alpha=5.0, unet_targets=("to_v", "ff.net.2", "proj_out"), text_encoder=False, seed=2)
    return first, second


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, 16, 16, generator=generator),
        torch.randn(1, 7, 32, generator=generator),
        torch.randint(0, 400, (2, 9), generator=generator),
    )


@torch.no_grad()
def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs."""
    latents, context, ids = _inputs()
    return pipe.unet(latents, 10, context).sample, pipe.text_encoder(ids)[0]


def _tensors_bytes(path) -> dict[str, bytes]:
    header = read_header(path)
    data = path.read_bytes()
    return {name: data[info.begin : info.end] for name, info in header.tensors.items()}


def _single_file_checkpoint(model_dir, out):
    """The tiny pipeline as an SD1 single-file checkpoint, UNet and text encoder named by formats' LDM functions."""
    table = ldm.ldm_unet_table_for_config(json.loads((model_dir / "unet/config.json").read_text()))
    tensors = {single_file_slot("unet", k, table, None, {}).key: v for k, v in load_file(model_dir / UNET_FILE).items()}
    tensors.update(
        {single_file_slot("text_encoder", k, table, SD1.text_encoders[0], {}).key: v for k, v in load_file(model_dir / TE_FILE).items()}
    )
    tensors.update({"first_stage_model." + k: v for k, v in load_file(model_dir / "vae/diffusion_pytorch_model.safetensors").items()})
    save_file(tensors, out, metadata={"format": "pt", "note": "kept"})
    return out, table


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert parse_lora_arg("dir:with:colons/a.safetensors:-0.3") == ("dir:with:colons/a.safetensors", -0.3)
    assert parse_lora_arg("dir:x/a.safetensors") == ("dir:x/a.safetensors", 1.0)
    assert parse_lora_arg(":0.5") == (":0.5", 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("a.safetensors:nan")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' second adapter, as intended
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_merge_matches_diffusers_fuse_lora(fmt, two_loras, tiny_model_dir, tmp_path):
    files = [write_lora(state, tmp_path / f"{name}.safetensors", fmt) for name, state in zip("ab", two_loras)]
    stats = MergeStats()
    out = merge_model(tiny_model_dir, [(files[0], 0.7), (files[1], -0.3)], tmp_path / "merged", stats=stats)
    assert stats.modules == len(two_loras[0]) + len(two_loras[1])

    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    reference.load_lora_weights(str(files[0]), adapter_name="a")
    reference.load_lora_weights(str(files[1]), adapter_name="b")
    reference.set_adapters(["a", "b"], [0.7, -0.3])
    reference.fuse_lora(adapter_names=["a", "b"])
    expected_unet, expected_text = _outputs(reference)
    base_unet, base_text = _outputs(StableDiffusionPipeline.from_pretrained(tiny_model_dir))
    merged_unet, merged_text = _outputs(StableDiffusionPipeline.from_pretrained(out))
    assert not torch.allclose(expected_unet, base_unet, rtol=1e-2) and not torch.allclose(expected_text, base_text, rtol=1e-2)
    torch.testing.assert_close(merged_unet, expected_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_text, expected_text, rtol=1e-4, atol=1e-5)


def test_untouched_tensors_and_files_are_byte_identical(two_loras, tiny_model_dir, tmp_path):
    out = merge_model(tiny_model_dir, [(two_loras[0], 0.7), (two_loras[1], -0.3)], tmp_path / "merged")
    adapted = {path.split(".", 1)[1] + ".weight" for state in two_loras for path in state.modules if path.startswith("unet.")}
    before, after = _tensors_bytes(tiny_model_dir / UNET_FILE), _tensors_bytes(out / UNET_FILE)
    assert before.keys() == after.keys() and adapted < before.keys()
    for name in before:
        assert (before[name] == after[name]) == (name not in adapted), name
    assert read_header(out / UNET_FILE).raw == read_header(tiny_model_dir / UNET_FILE).raw  # header kept verbatim
    for source in tiny_model_dir.rglob("*"):
        if source.is_file() and source.relative_to(tiny_model_dir).as_posix() not in (UNET_FILE, TE_FILE, MARKER_FILE):
            assert (out / source.relative_to(tiny_model_dir)).read_bytes() == source.read_bytes(), source
    assert {p.relative_to(out) for p in out.rglob("*")} == {p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*")}
    assert json.loads((out / MARKER_FILE).read_text())["command"] == "merge"  # the marker names the merge that wrote it


def test_merge_then_unmerge_restores_weights(two_loras, tiny_model_dir, tmp_path):
    loras = [(two_loras[0], 0.7), (two_loras[1], -0.3)]
    merged = merge_model(tiny_model_dir, loras, tmp_path / "merged")
    restored = merge_model(merged, [(state, -scale) for state, scale in loras], tmp_path / "restored")
    for name in (UNET_FILE, TE_FILE):
        original, changed, back = load_file(tiny_model_dir / name), load_file(merged / name), load_file(restored / name)
        assert any(not torch.equal(original[k], changed[k]) for k in original)
        for key, weight in original.items():
            assert (back[key] - weight).abs().max() <= 1e-6 * weight.abs().max(), key


def test_scale_zero_gives_the_base_output(two_loras, tiny_model_dir, tmp_path):
    out = merge_model(tiny_model_dir, [(two_loras[0], 0.0)], tmp_path / "merged")
    base = _outputs(StableDiffusionPipeline.from_pretrained(tiny_model_dir))
    merged = _outputs(StableDiffusionPipeline.from_pretrained(out))
    assert torch.equal(base[0], merged[0]) and torch.equal(base[1], merged[1])


def test_conv_loras_merge_like_the_conv_they_stand_for(tiny_pipe):
    attention = tiny_pipe.unet.down_blocks[1].attentions[0]
    assert not tiny_pipe.unet.config.use_linear_projection and attention.proj_in.kernel_size == (1, 1)
    resnet = tiny_pipe.unet.down_blocks[0].resnets[0]
    assert resnet.conv1.kernel_size == (3, 3)
    generator = torch.Generator().manual_seed(3)
    layers = {"down_blocks.1.attentions.0.proj_in": attention.proj_in, "down_blocks.0.resnets.0.conv1": resnet.conv1}
    modules = {}
    for path, conv in layers.items():
        kh, kw = conv.kernel_size
        down = torch.randn(4, conv.in_channels, kh, kw, generator=generator) * 0.1
        modules["unet." + path] = LoraModule(down, torch.randn(conv.out_channels, 4, 1, 1, generator=generator) * 0.1, alpha=3.0)
    x = {path: torch.randn(1, conv.in_channels, 16, 16, generator=generator) for path, conv in layers.items()}
    with torch.no_grad():
        # LoRA as two convs: down (the layer's kernel, stride and padding) then up (1x1), times 0.7 * alpha / rank
        expected = {
            path: conv(x[path])
            + 0.7
            * 3.0
            / 4
            * F.conv2d(
                F.conv2d(x[path], modules["unet." + path].down, stride=conv.stride, padding=conv.padding), modules["unet." + path].up
            )
            for path, conv in layers.items()
        }
        assert merge_lora(tiny_pipe, [(LoraState(modules), 0.7)]) == 2
        for path, conv in layers.items():
            torch.testing.assert_close(conv(x[path]), expected[path], rtol=1e-4, atol=1e-5)


def test_in_memory_merge_equals_streamed_merge(two_loras, tiny_pipe, tiny_model_dir, tmp_path):
    loras = [(two_loras[0], 0.7), (two_loras[1], -0.3)]
    out = merge_model(tiny_model_dir, loras, tmp_path / "merged")
    assert merge_lora(tiny_pipe, loras) == len(two_loras[0]) + len(two_loras[1])
    for name, tensor in load_file(out / UNET_FILE).items():
        assert torch.equal(tiny_pipe.unet.state_dict()[name], tensor), name


def test_fp16_output(two_loras, tiny_model_dir, tmp_path):
    loras = [(two_loras[0], 0.7), (two_loras[1], -0.3)]
    fp32 = merge_model(tiny_model_dir, loras, tmp_path / "fp32")
    fp16 = merge_model(tiny_model_dir, loras, tmp_path / "fp16", dtype="fp16")
    for name in (UNET_FILE, TE_FILE, "vae/diffusion_pytorch_model.safetensors"):
        reference, half = load_file(fp32 / name), load_file(fp16 / name)
        assert all(t.dtype == torch.float16 for t in half.values()), name
        for key, tensor in reference.items():
            assert torch.equal(half[key], tensor.half()), key  # merged in fp32, then cast once
    pipe = StableDiffusionPipeline.from_pretrained(fp16, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


def test_sharded_weights_merge_like_one_file(two_loras, tiny_model_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / UNET_FILE).unlink()
    UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").save_pretrained(sharded / "unet", max_shard_size="2MB")
    shards = sorted((sharded / "unet").glob("*.safetensors"))
    assert len(shards) > 1
    loras = [(two_loras[0], 0.7)]
    whole = load_file(merge_model(tiny_model_dir, loras, tmp_path / "whole") / UNET_FILE)
    out = merge_model(sharded, loras, tmp_path / "merged", dtype="bf16")
    index = json.loads((out / "unet/diffusion_pytorch_model.safetensors.index.json").read_text())
    merged = {k: v for shard in shards for k, v in load_file(out / "unet" / shard.name).items()}
    assert merged.keys() == whole.keys() and index["metadata"]["total_size"] == sum(t.nbytes for t in merged.values())
    for key, tensor in whole.items():
        assert torch.equal(merged[key], tensor.bfloat16()), key


def test_copy_without_copy_file_range_is_byte_identical(two_loras, tiny_model_dir, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(safetensors_stream.os, "copy_file_range", unsupported, raising=False)
    monkeypatch.setattr(safetensors_stream, "_CHUNK", 4096)  # many chunks, each must land at the right place
    fallback = merge_model(tiny_model_dir, [(two_loras[0], 0.7)], tmp_path / "fallback")
    monkeypatch.undo()
    kernel = merge_model(tiny_model_dir, [(two_loras[0], 0.7)], tmp_path / "kernel")
    assert (fallback / UNET_FILE).read_bytes() == (kernel / UNET_FILE).read_bytes()


def test_text_encoder_weights_with_or_without_text_model_level(two_loras, tiny_model_dir, tmp_path):
    # transformers 4 saves CLIP weights as text_model.encoder...; transformers 5 as encoder...
    older = tmp_path / "older"
    shutil.copytree(tiny_model_dir, older)
    weights = load_file(older / TE_FILE)
    save_file({"text_model." + k: v for k, v in weights.items()}, older / TE_FILE, metadata={"format": "pt"})
    stale = older / "unet" / "diffusion_pytorch_model.bin"
    stale.write_bytes(b"unmerged pickle weights")
    newer = load_file(merge_model(tiny_model_dir, [(two_loras[0], 0.7)], tmp_path / "newer") / TE_FILE)
    out = merge_model(older, [(two_loras[0], 0.7)], tmp_path / "merged")
    merged = load_file(out / TE_FILE)
    assert all(torch.equal(merged["text_model." + k], v) for k, v in newer.items())
    assert any(not torch.equal(newer[k], v) for k, v in weights.items())
    assert not (out / "unet" / "diffusion_pytorch_model.bin").exists()  # it would still hold the unmerged weights


def test_single_file_to_folder_merges_in_memory(two_loras, tiny_model_dir, tmp_path, monkeypatch):
    checkpoint, _ = _single_file_checkpoint(tiny_model_dir, tmp_path / "model.safetensors")
    calls = []

    def fake_load(model, **kwargs):
        calls.append((model, kwargs))
        return StableDiffusionPipeline.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(models, "load_pipeline", fake_load)
    out = merge_model(checkpoint, [(two_loras[0], 0.7)], tmp_path / "merged", dtype="bf16", config=str(tiny_model_dir))
    assert calls == [(str(checkpoint), {"config": str(tiny_model_dir), "allow_pickle": False})]
    streamed = load_file(merge_model(tiny_model_dir, [(two_loras[0], 0.7)], tmp_path / "streamed") / UNET_FILE)
    assert all(torch.equal(t, streamed[k].bfloat16()) for k, t in load_file(out / UNET_FILE).items())


def test_single_file_names_agree_with_diffusers(tiny_model_dir, tmp_path):
    checkpoint, table = _single_file_checkpoint(tiny_model_dir, tmp_path / "model.safetensors")
    assert ldm.ldm_unet_table_from_keys(load_file(checkpoint)) == table
    assert ldm.ldm_unet_table_for_config(UNet2DConditionModel.load_config(tiny_model_dir / "unet")) == table
    sd15 = {
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    assert ldm.ldm_unet_table_for_config(sd15) == ldm.LDM_SD1  # the kohya-LDM reader's table
    assert ldm.ldm_unet_key("up_blocks.0.upsamplers.0.conv.weight", ldm.LDM_SD1) == "output_blocks.2.1.conv.weight"
    assert ldm.ldm_unet_key("up_blocks.1.upsamplers.0.conv.weight", ldm.LDM_SD1) == "output_blocks.5.2.conv.weight"
    unet = UNet2DConditionModel.from_single_file(str(checkpoint), config=str(tiny_model_dir), subfolder="unet")
    original = load_file(tiny_model_dir / UNET_FILE)
    assert unet.state_dict().keys() == original.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in original.items())


def test_single_file_merge_equals_folder_merge(two_loras, tiny_model_dir, tmp_path):
    checkpoint, table = _single_file_checkpoint(tiny_model_dir, tmp_path / "model.safetensors")
    loras = [(two_loras[0], 0.7), (two_loras[1], -0.3)]
    folder = merge_model(tiny_model_dir, loras, tmp_path / "merged")
    out = merge_model(checkpoint, loras, single_file=tmp_path / "merged.safetensors")
    merged, before = _tensors_bytes(out), _tensors_bytes(checkpoint)
    expected = {single_file_slot("unet", k, table, None, {}).key: v for k, v in load_file(folder / UNET_FILE).items()}
    expected.update(
        {single_file_slot("text_encoder", k, table, SD1.text_encoders[0], {}).key: v for k, v in load_file(folder / TE_FILE).items()}
    )
    adapted = [key for key in expected if merged[key] != before[key]]
    assert len(adapted) == len({p for state in two_loras for p in state.modules})
    written = load_file(out)
    for key in adapted:
        assert torch.equal(written[key], expected[key]), key
    assert all(merged[key] == before[key] for key in before if key not in adapted)
    assert read_header(out).metadata == {"format": "pt", "note": "kept", "sdlora_version": __version__}  # kept, and marked as ours


def test_nan_or_inf_merge_refuses_to_write(tiny_pipe, tiny_model_dir, tmp_path, random_lora_state):
    broken = random_lora_state(tiny_pipe, text_encoder=False)
    next(iter(broken.modules.values())).up[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"LoRA #1 holds NaN or inf values in 1 modules"):  # refused before any reading of the model
        merge_model(tiny_model_dir, [(broken, 1.0)], tmp_path / "merged")
    huge = random_lora_state(tiny_pipe, text_encoder=False)
    with pytest.raises(ValueError, match=r"NaN or inf .*\(float16\)"):
        merge_model(tiny_model_dir, [(huge, 1e7)], tmp_path / "merged", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_lora(tiny_pipe, [(random_lora_state(tiny_pipe, text_encoder=False), 1.0), (broken, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())  # untouched on refusal


def test_unmatched_or_misfit_modules_are_errors(tiny_pipe, tiny_model_dir, tmp_path, random_lora_state):
    state = random_lora_state(tiny_pipe, text_encoder=False)
    state.modules["unet.down_blocks.9.attentions.0.proj_in"] = LoraModule(torch.zeros(2, 64), torch.zeros(64, 2))
    with pytest.raises(ValueError, match=r"LoRA module unet\.down_blocks\.9\.attentions\.0\.proj_in matches no weight"):
        merge_model(tiny_model_dir, [(state, 1.0)], tmp_path / "merged")
    with pytest.raises(ValueError, match=r"matches no weight"):
        merge_lora(tiny_pipe, [(state, 1.0)])
    misfit = LoraState({"unet.down_blocks.1.attentions.0.proj_in": LoraModule(torch.zeros(2, 32, 3, 3), torch.zeros(64, 2, 1, 1))})
    with pytest.raises(ValueError, match=r"proj_in makes a \[64, 32, 3, 3\] update but weight .*proj_in.weight is \[64, 64, 1, 1\]"):
        merge_model(tiny_model_dir, [(misfit, 1.0)], tmp_path / "merged")
    with pytest.raises(ValueError, match="single-file"):
        merge_model(tiny_model_dir, [(state, 1.0)], single_file=tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_cli_merge_unmerge_and_model_tiny(two_loras, tiny_model_dir, tmp_path, capsys):
    files = [write_lora(state, tmp_path / f"{name}.safetensors", "kohya") for name, state in zip("ab", two_loras)]
    lora_args = ["--lora", f"{files[0]}:0.7", "--lora", f"{files[1]}:-0.3"]
    assert main(["merge", "--model", str(tiny_model_dir), *lora_args, "--out", str(tmp_path / "merged")]) == 0
    assert f"merged {len(two_loras[0]) + len(two_loras[1])} LoRA modules into" in capsys.readouterr().out
    assert main(["unmerge", "--model", str(tmp_path / "merged"), *lora_args, "--out", str(tmp_path / "restored")]) == 0
    original, restored = load_file(tiny_model_dir / UNET_FILE), load_file(tmp_path / "restored" / UNET_FILE)
    assert all((restored[k] - v).abs().max() <= 1e-6 * v.abs().max() for k, v in original.items())
    assert main(["merge", "--model", "tiny", "--lora", str(files[0]), "--out", str(tmp_path / "from-tiny")]) == 0
    single = merge_model(tiny_model_dir, [(files[0], 1.0)], tmp_path / "single-a")
    assert load_file(tmp_path / "from-tiny" / UNET_FILE).keys() == load_file(single / UNET_FILE).keys()
    assert all(torch.equal(v, load_file(single / UNET_FILE)[k]) for k, v in load_file(tmp_path / "from-tiny" / UNET_FILE).items())


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "LoRA file not found"),
        ("misfit", "makes a"),
        ("unmatched", "matches no weight"),
        ("same", "is the input"),
    ],
)
def test_cli_errors_are_one_line_and_leave_no_output(case, message, tiny_pipe, tiny_model_dir, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    if case == "misfit":
        write_lora(
            LoraState({"unet.down_blocks.1.attentions.0.proj_out": LoraModule(torch.ones(2, 32), torch.ones(48, 2))}), lora, "diffusers"
        )
    elif case in ("unmatched", "same"):
        write_lora(LoraState({"unet.up_blocks.7.attentions.0.proj_out": LoraModule(torch.ones(2, 64), torch.ones(64, 2))}), lora, "kohya")
    out = tiny_model_dir if case == "same" else tmp_path / "out" / "merged"
    before = sorted(tmp_path.rglob("*"))
    assert main(["merge", "--model", str(tiny_model_dir), "--lora", f"{lora}:0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora merge: error: ") and message in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no temporary left
    assert (tiny_model_dir / UNET_FILE).is_file()
