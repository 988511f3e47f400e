"""Training SDXL on the tiny SDXL model: both encoders' conditioning, time ids, caches, resume, outputs, the VAE."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.core.families import SDXL
from sdlora.training import recipe
from sdlora.training.cache import encode_captions
from sdlora.training.data import ImageRecord, crop_window, sdxl_time_ids


def _sdxl_config(tiny_config, data: Path, out: Path, **overrides):
    return tiny_config(data, out, model="tiny-sdxl", **overrides)


def test_captions_condition_as_the_sdxl_pipeline_encodes_its_prompts(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe
    captions = ["a red circle on grey", "two blue squares, flat poster"]
    hidden, pooled = encode_captions(
        pipe, {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}, SDXL, captions, "cpu"
    )
    prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert hidden.shape == (2, 77, 32 + 48) and pooled.shape == (2, 48)  # penultimate layers of both, pooled of the second
    torch.testing.assert_close(hidden, prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, pooled_embeds, rtol=0, atol=0)


def test_an_empty_caption_conditions_with_zeros_as_the_pipeline_does(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe
    hidden, pooled = encode_captions(
        pipe, {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}, SDXL, ["", "a cat"], "cpu"
    )
    assert hidden[0].abs().max() == 0 and pooled[0].abs().max() == 0
    assert hidden[1].abs().max() > 0 and pooled[1].abs().max() > 0


def test_time_ids_are_original_size_crop_corner_and_bucket(tmp_path):
    record = ImageRecord(tmp_path / "x.png", "x", width=96, height=60)  # landscape, not the bucket's aspect
    size = (80, 48)  # (width, height)
    scale = max(80 / 96, 48 / 60)  # 0.8333: the width decides, the height is cut
    resized = (round(96 * scale), round(60 * scale))  # (80, 50)
    window = crop_window(record, size, "center")
    assert window == (scale, (resized[0] - 80) // 2, (resized[1] - 48) // 2)
    assert sdxl_time_ids(record, size, window, flip=False) == [60, 96, 1, 0, 48, 80]  # (h, w), (top, left), (h, w)
    shifted = crop_window(record, (64, 48), "random", random.Random(0))  # 0.8 wide: 77 x 48, 13 columns to spare
    left = int(shifted[1])
    assert sdxl_time_ids(record, (64, 48), shifted, flip=True)[3] == round(96 * shifted[0]) - 64 - left  # mirrored crop


def test_a_run_conditions_each_image_on_its_own_size_and_bucket(tmp_path, tiny_config):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 60), (200, 40, 40)).save(data / "wide.png")
    Image.new("RGB", (64, 64), (40, 40, 200)).save(data / "square.png")
    run = recipe.setup(_sdxl_config(tiny_config, data, tmp_path / "run", batch_size=1, caption="a shape"))
    assert run.config.data.buckets is True and run.config.data.resolution == 64  # SDXL's defaults: buckets on, the model's size
    wide = next(i for i, r in enumerate(run.records) if r.path.name == "wide.png")
    width, height = run.buckets[wide]
    assert width > height
    _, conditioning, _ = run.encoder([wide], random.Random(0), torch.Generator().manual_seed(0))
    record = run.records[wide]
    expected = sdxl_time_ids(record, (width, height), crop_window(record, (width, height), "center"), flip=False)
    assert conditioning.time_ids.tolist() == [[float(v) for v in expected]] and expected[:2] == [60, 96]
    assert conditioning.hidden.shape[-1] == 80 and conditioning.pooled.shape == (1, 48)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@pytest.mark.slow  # a full CLI run on the tiny SDXL model
def test_cli_trains_two_steps_and_writes_every_output(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "data", count=6)
    out = tmp_path / "run"
    argv = ["train", str(data), "--model", "tiny-sdxl", "--output", str(out), "--steps", "2", "--rank", "4", "--alpha", "8",
            "--batch-size", "2", "--checkpoint-every", "1", "--validate-every", "1", "--sample-steps", "1", "--trigger", "sks",
            "--train-text-encoder", "--val-split", "0.34", "--prediction-type", "v_prediction"]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "lora.safetensors",
        "config.toml",
        "README.md",
        "metrics.jsonl",
        "samples",
        "checkpoints",
    } <= names
    kohya = _lora(out / "lora.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in kohya)  # kohya's SDXL (LDM) names
    assert not any(k.startswith("lora_unet_down_blocks") for k in kohya)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    with safe_open(str(out / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert (
        metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    )
    diffusers = _lora(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".", 1)[0] for k in diffusers} == {"unet", "text_encoder", "text_encoder_2"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and any("val_loss" in r for r in rows)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000001.png", "step-00000002.png"]
    assert "buckets = true" in (out / "config.toml").read_text() and 'prediction_type = "v_prediction"' in (out / "config.toml").read_text()


@pytest.mark.slow  # two training runs
def test_cached_and_uncached_runs_train_the_same_sdxl_lora(tmp_path, dataset, tiny_config):
    # batch 1: the uncached path encodes one image per VAE call, as the cache does; captions are still encoded 16 at
    # a time into the cache and one at a time without it, which Adam turns into differences of a few 1e-6
    config = dict(steps=3, batch_size=1, checkpoint_every=0)
    paths = [recipe.train(_sdxl_config(tiny_config, dataset, tmp_path / cache, cache=cache, **config)) for cache in ("memory", "off")]
    cached, uncached = (_lora(p) for p in paths)
    assert cached.keys() == uncached.keys()
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow  # three training runs
def test_resume_gives_the_same_sdxl_lora_bit_for_bit(tmp_path, dataset, tiny_config):
    straight = recipe.train(_sdxl_config(tiny_config, dataset, tmp_path / "straight", steps=4, checkpoint_every=2, train_text_encoder=True))
    recipe.train(_sdxl_config(tiny_config, dataset, tmp_path / "resumed", steps=2, checkpoint_every=2, train_text_encoder=True))
    resumed = recipe.train(
        _sdxl_config(tiny_config, dataset, tmp_path / "resumed", steps=4, checkpoint_every=2, train_text_encoder=True, resume="latest")
    )
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_both_text_encoders_train_each_at_its_own_rate(tmp_path, dataset, tiny_config):
    config = _sdxl_config(
        tiny_config,
        dataset,
        tmp_path / "run",
        steps=2,
        checkpoint_every=0,
        train_text_encoder=True,
        text_encoder_lr=3e-4,
        text_encoder_2_lr=2e-4,
    )
    run = recipe.setup(config)
    assert [group["lr"] for group in run.optimizer.param_groups] == [1e-3, 3e-4, 2e-4]
    recipe.run_steps(run)
    state = recipe.lora_state(run)
    # q, k, v, out of the layers the UNet reads: the first encoder's penultimate output (so 4 of its 5 layers), the
    # second's too but also its pooled output, which comes out of its last layer (all 5)
    for component, layers in (("text_encoder", 4), ("text_encoder_2", 5)):
        modules = state.for_component(component)
        assert len(modules) == 4 * layers
        assert all(m.up.abs().max().item() > 0 for m in modules.values())  # each got a gradient and moved from its zero start
    recipe.save_outputs(run)


def test_vae_stays_fp32_under_half_precision_where_sdxl_says_so(tmp_path, dataset, tiny_config):
    run = recipe.setup(_sdxl_config(tiny_config, dataset, tmp_path / "xl", mixed_precision="bf16", steps=1, checkpoint_every=0))
    assert (
        run.model.pipe.vae.config.force_upcast and run.model.pipe.vae.dtype == torch.float32 and run.model.pipe.unet.dtype == torch.bfloat16
    )
    sd1 = recipe.setup(tiny_config(dataset, tmp_path / "sd1", mixed_precision="bf16", steps=1, checkpoint_every=0))
    assert sd1.model.pipe.vae.dtype == torch.bfloat16  # SD1's VAE runs in half precision


def test_a_fixed_vae_replaces_the_models_own(tmp_path, dataset, tiny_config, tiny_sdxl_dir):
    vae_dir = shutil.copytree(tiny_sdxl_dir / "vae", tmp_path / "vae")
    weights = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    weights["decoder.conv_out.bias"] = weights["decoder.conv_out.bias"] + 0.5
    from safetensors.torch import save_file

    save_file(weights, str(vae_dir / "diffusion_pytorch_model.safetensors"))
    run = recipe.setup(_sdxl_config(tiny_config, dataset, tmp_path / "run", vae=str(vae_dir), steps=1, checkpoint_every=0))
    assert torch.equal(run.model.pipe.vae.decoder.conv_out.bias, weights["decoder.conv_out.bias"])


def _overflowing_vae_model(tiny_sdxl_dir: Path, folder: Path) -> Path:
    """The tiny SDXL model with a VAE that overflows in fp16 (and says it needs no upcast): as fp16 VAEs do."""
    from safetensors.torch import save_file

    model = shutil.copytree(tiny_sdxl_dir, folder)
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    weights = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    weights["encoder.conv_in.weight"] = weights["encoder.conv_in.weight"] * 1e6  # finite in fp32, inf in fp16
    save_file(weights, str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    return model


def test_nan_latents_in_fp16_are_one_line_naming_the_image_and_leave_nothing(tmp_path, dataset, tiny_sdxl_dir, capsys):
    model = _overflowing_vae_model(tiny_sdxl_dir, tmp_path / "model")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(dataset),
            "--model",
            str(model),
            "--output",
            str(out),
            "--mixed-precision",
            "fp16",
            "--steps",
            "1",
            "--trigger",
            "sks",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert (
        err[-1].startswith("sdlora train: error: the VAE gives NaN or inf latents for ") and "img0" in err[-1] and "(in float16)" in err[-1]
    )
    assert "--vae" in err[-1] and not out.exists()


def test_what_the_caches_hold_leaves_the_accelerator(tmp_path, dataset, tiny_config):
    """Once the caches are filled, the steps need neither the VAE nor the frozen text encoders: they are offloaded
    (moved back only while validation draws samples); a trained encoder stays."""
    cached = recipe.setup(_sdxl_config(tiny_config, dataset, tmp_path / "cached", steps=1, checkpoint_every=0))
    pipe = cached.model.pipe
    assert cached.model.offloaded == [pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    training_encoders = recipe.setup(
        _sdxl_config(tiny_config, dataset, tmp_path / "te", steps=1, checkpoint_every=0, train_text_encoder=True)
    )
    assert training_encoders.model.offloaded == [training_encoders.model.pipe.vae]
    uncached = recipe.setup(_sdxl_config(tiny_config, dataset, tmp_path / "off", steps=1, checkpoint_every=0, cache="off"))
    assert uncached.model.offloaded == []
