"""`--fp8-base`: frozen Linear/Conv2d weights stored as float8_e4m3fn, cast up per layer as it runs (#26)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sdlora.config import load_toml
from sdlora.core.files import read_lora
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training import recipe
from sdlora.training.base_model import load_base_model
from sdlora.training.config import BaseModelConfig
from sdlora.training.fp8 import FP8, Fp8Conv2d, Fp8Linear, frozen_weight_bytes, store_weights_in_fp8


def _layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"linear": nn.Linear(5, 7), "conv": nn.Conv2d(3, 4, 3, stride=2, padding=1), "norm": nn.LayerNorm(7)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_layers_compute_as_the_rounded_weights_do_forward_and_backward(dtype):
    fp8 = _layers().to(dtype).requires_grad_(False)
    stored = store_weights_in_fp8(fp8, dtype)
    assert sorted(stored) == ["conv.weight", "linear.weight"]
    assert isinstance(fp8["linear"], Fp8Linear) and isinstance(fp8["conv"], Fp8Conv2d)
    assert fp8["linear"].weight.dtype == FP8 and fp8["linear"].bias.dtype == dtype and fp8["norm"].weight.dtype == dtype
    reference = _layers().to(dtype).requires_grad_(False)  # the same weights, rounded through fp8, in plain layers
    for name in ("linear", "conv"):
        reference[name].weight.copy_(fp8[name].weight.to(dtype))
    for name, shape in (("linear", (2, 3, 5)), ("conv", (2, 3, 9, 7))):
        inputs = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        x, y = inputs.clone().requires_grad_(True), inputs.clone().requires_grad_(True)
        out, expected = fp8[name](x), reference[name](y)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_backward_keeps_the_fp8_weight_not_an_upcast_copy():
    model = _layers().to(torch.bfloat16).requires_grad_(False)
    store_weights_in_fp8(model, torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model["conv"](torch.randn(1, 3, 8, 8, dtype=torch.bfloat16, requires_grad=True))
        model["linear"](torch.randn(2, 5, dtype=torch.bfloat16, requires_grad=True))
    weights = [t for t in saved if t.numel() in (model["conv"].weight.numel(), model["linear"].weight.numel())]  # any layout
    assert len(weights) == 2 and all(t.dtype == FP8 for t in weights)  # a bf16 copy would hold twice the bytes until backward


def test_fp8_layers_give_peft_lora_its_compute_dtype_and_train_through_it():
    from peft import LoraConfig, inject_adapter_in_model

    model = _layers().requires_grad_(False)
    store_weights_in_fp8(model, torch.float32)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3.0, target_modules=["linear", "conv"], init_lora_weights="gaussian"), model)
    assert model["linear"].base_layer.weight.dtype == FP8
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    x = torch.randn(2, 3, 8, 8)
    model["conv"](x).square().mean().backward()
    assert model["conv"].lora_B["default"].weight.grad.abs().sum() > 0  # through the fp8 base layer's input path too
    assert "linear.base_layer.weight" in model._ddp_params_and_buffers_to_ignore  # DDP must not broadcast fp8


def test_frozen_unet_weights_take_half_the_bytes_of_bf16():
    bf16 = load_base_model(BaseModelConfig(model="tiny", mixed_precision="bf16"), torch.device("cpu"))
    fp8 = load_base_model(BaseModelConfig(model="tiny", mixed_precision="bf16", fp8_base=True), torch.device("cpu"))
    assert frozen_weight_bytes(fp8.unet) <= 0.55 * frozen_weight_bytes(bf16.unet)  # 0.5: one byte a weight instead of two
    assert fp8.dtype == torch.bfloat16  # the compute dtype: what inputs, latents and biases are in
    for part in (fp8.unet, fp8.pipe.text_encoder):
        layers = [m for m in part.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers and all(m.weight.dtype == FP8 for m in layers)
        assert all(m.bias is None or m.bias.dtype == torch.bfloat16 for m in layers)
        others = [p for m in part.modules() if not isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters(recurse=False)]
        assert others and all(p.dtype == torch.bfloat16 for p in others)  # norms, embeddings
    assert next(fp8.pipe.vae.parameters()).dtype == torch.bfloat16  # the VAE only encodes the cache: left alone


def test_sdxl_both_text_encoders_are_stored_in_fp8_and_the_pipeline_still_draws():
    model = load_base_model(BaseModelConfig(model="tiny-sdxl", mixed_precision="bf16", fp8_base=True), torch.device("cpu"))
    assert model.text_encoders["text_encoder_2"].text_projection.weight.dtype == FP8
    # the SDXL pipeline casts prompt embeddings to each text encoder's .dtype: that must stay the compute dtype
    assert {encoder.dtype for encoder in model.text_encoders.values()} == {torch.bfloat16}
    with torch.autocast("cpu", torch.bfloat16):
        images = model.pipe("a red cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and float(abs(images).mean()) > 0


def test_tiny_unet_with_fp8_weights_is_close_to_fp32():
    pipe = build_tiny_pipeline()
    unet = pipe.unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 500])
    expected = unet(sample, timesteps, text).sample
    store_weights_in_fp8(unet, torch.float32)
    got = unet(sample, timesteps, text).sample
    error = ((got - expected).norm() / expected.norm()).item()
    # measured 0.094 on this random model (each weight is off by up to 1/16 of itself: e4m3 has 3 mantissa bits)
    assert 0.0 < error < 0.15


def test_training_with_fp8_base_runs_and_writes_loadable_loras(dataset, tmp_path, tiny_config):
    out = tmp_path / "out"
    # fp32 compute (fp8 weights cast up to fp32): the CPU's bf16 runs are slow, and the bf16 layers are checked above
    config = tiny_config(
        dataset, out, steps=2, fp8_base=True, preset="all", train_text_encoder=True, gradient_checkpointing=True,
        checkpoint_every=0, val_split=0.34, validation_prompts=[],
    )  # fmt: skip
    path = recipe.train(config)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line] + [line["val_loss"] for line in lines if "val_loss" in line]
    assert len(losses) >= 3 and all(torch.isfinite(torch.tensor(losses)))
    state = read_lora(path)
    kohya = read_lora(out / "lora.safetensors")
    assert kohya.modules.keys() == state.modules.keys()
    assert any(p.startswith("text_encoder.") for p in state.modules) and any(m.down.ndim == 4 for m in state.modules.values())
    assert all(float(m.up.abs().sum()) > 0 for m in state.modules.values())  # B left zero: the LoRA trained
    assert load_toml(out / "config.toml")["fp8_base"] is True  # in the run's record, and a rerun from it uses it


@pytest.mark.slow
def test_two_cpu_processes_train_with_fp8_base(dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541", "-m", "sdlora", "train",
        str(dataset), "--model", "tiny", "--output", str(out), "--steps", "2", "--resolution", "64", "--rank", "4", "--alpha", "8",
        "--batch-size", "1", "--trigger", "sks", "--sample-steps", "1", "--checkpoint-every", "0", "--validate-every", "0", "--fp8-base",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # gloo has no float8: DDP must leave the frozen weights alone
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["processes_in_sync"] for line in lines if "processes_in_sync" in line] == [2]
