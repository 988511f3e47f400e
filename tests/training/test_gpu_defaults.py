"""What a GPU run gets by default and what can be switched off: --mixed-precision auto, TF32, fused AdamW, gradient
checkpointing for SDXL at 1024 px, the caches filled before the UNet reaches the accelerator, --no-samples, VAE tiling
for large samples, --compile, images loaded ahead on worker threads, and the host synchronisations of one training step. The CPU has no CUDA: where a
decision depends on it, torch's answers are replaced and the decision is read, not run."""

from __future__ import annotations

import collections
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sdlora.errors import UserError
from sdlora.training import cache, recipe
from sdlora.training.config import BaseModelConfig, TrainConfig
from sdlora.training.metrics import read_metrics
from sdlora.training.optimizers import build_optimizer, device_optimizer_args
from sdlora.training.validation import TILING_FROM_PIXELS, decoding_in_tiles

# ---------------------------------------------------------------- --mixed-precision auto


@pytest.mark.parametrize(
    ("cuda", "bf16", "options", "expected"),
    [
        (False, False, {}, "no"),  # a CPU: fp32 (bf16 runs slower there)
        (True, True, {}, "bf16"),  # Ampere and newer
        (True, False, {}, "fp16"),  # T4, V100, 20xx: fp16 with accelerate's loss scaler
        (True, True, {"mixed_precision": "no"}, "no"),  # a given value is kept
        (False, False, {"mixed_precision": "fp16"}, "fp16"),
        (True, False, {"full_bf16": True}, "bf16"),  # what --full-bf16 needs, whatever the device
        (False, False, {"full_fp16": True}, "fp16"),
    ],
)
def test_auto_precision_follows_the_device(monkeypatch, cuda, bf16, options, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert recipe.resolve_mixed_precision(BaseModelConfig(**options)) == expected


def test_auto_is_the_default_and_full_precisions_accept_it():
    assert BaseModelConfig().mixed_precision == "auto"
    BaseModelConfig(full_bf16=True)  # auto becomes bf16
    with pytest.raises(UserError, match="--full-bf16 needs --mixed-precision bf16"):
        BaseModelConfig(full_bf16=True, mixed_precision="fp16")


def test_a_cpu_run_records_the_precision_it_ran_in(tiny_config, dataset, tmp_path):
    out = tmp_path / "out"
    recipe.train(tiny_config(dataset, out, steps=1, checkpoint_every=0))
    assert 'mixed_precision = "no"' in (out / "config.toml").read_text()


# ---------------------------------------------------------------- fused AdamW, TF32


def test_fused_adamw_on_cuda_only():
    assert device_optimizer_args("adamw", {}, "cuda") == {"fused": True}
    assert device_optimizer_args("adamw", {"foreach": False}, "cuda") == {"foreach": False}  # the user's choice
    assert device_optimizer_args("adamw", {"fused": False}, torch.device("cuda", 1)) == {"fused": False}
    assert device_optimizer_args("adamw", {}, "cpu") == {}
    assert device_optimizer_args("lion", {}, "cuda") == {}  # only torch's AdamW has the fused kernel


def test_fused_adamw_makes_the_same_update_as_the_loop():
    """torch has a fused AdamW kernel for the CPU too: the same arithmetic as the CUDA one, checked against the
    for-loop implementation sdlora uses on a CPU (what a GPU run's numbers are compared with)."""
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5, 3)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build_optimizer("adamw", [{"params": params, "lr": 1e-2}], 1e-2, 1e-2, {"fused": fused})
        for step in range(5):
            for index, param in enumerate(params):
                param.grad = torch.sin(param.detach() * (step + index + 1))
            optimizer.step()
        results.append(params)
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def test_tf32_is_set_only_on_a_gpu(tiny_config, dataset, tmp_path, monkeypatch):
    before = torch.backends.cuda.matmul.fp32_precision
    recipe._setup_accelerator(tiny_config(dataset, tmp_path / "out", mixed_precision="no"))
    assert torch.backends.cuda.matmul.fp32_precision == before  # the CPU: left as it was


# ---------------------------------------------------------------- gradient checkpointing by default


def _model(family: str, sample_size: int = 64):
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)), vae_scale_factor=8)
    return SimpleNamespace(pipe=pipe, unet=pipe.unet, family=SimpleNamespace(name=family, buckets_by_default=family == "sdxl"))


@pytest.mark.parametrize(
    ("family", "resolution", "given", "expected"),
    [
        ("sdxl", 1024, None, True),
        ("sdxl", 1536, None, True),
        ("sdxl", 768, None, False),
        ("sdxl", 1024, False, False),  # --no-gradient-checkpointing
        ("sd1", 1024, None, False),
        ("sd1", 512, True, True),
    ],
)
def test_gradient_checkpointing_default(tiny_config, dataset, tmp_path, family, resolution, given, expected):
    config = tiny_config(dataset, tmp_path / "out", resolution=resolution, gradient_checkpointing=given)
    assert recipe._model_defaults(config, _model(family)).base.gradient_checkpointing is expected


def test_sdxl_checkpointing_default_from_the_model_size(tiny_config, dataset, tmp_path):
    """No --resolution: the model's own size (128 latents = 1024 px for SDXL) decides."""
    config = tiny_config(dataset, tmp_path / "out", resolution=None)
    assert recipe._model_defaults(config, _model("sdxl", sample_size=128)).base.gradient_checkpointing is True
    assert recipe._model_defaults(config, _model("sdxl", sample_size=96)).base.gradient_checkpointing is False


# ---------------------------------------------------------------- the UNet reaches the accelerator after the caches


def test_caches_are_filled_before_the_unet_moves(tiny_config, dataset, tmp_path, monkeypatch):
    """The order of setup's events: the VAE and text encoders are moved at load, the UNet only after fill_caches,
    so setup's peak on a GPU is the larger of the two, not their sum."""
    events = []
    load, fill = recipe.load_base_model, recipe.fill_caches

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        move = model.unet.to

        def moving(*a, **k):
            events.append("unet to device")
            return move(*a, **k)

        model.unet.to = moving
        events.append(f"loaded, unet on {next(model.unet.parameters()).device}")
        return model

    def filling(*args, **kwargs):
        events.append("caches filled")
        return fill(*args, **kwargs)

    monkeypatch.setattr(recipe, "load_base_model", loading)
    monkeypatch.setattr(recipe, "fill_caches", filling)
    recipe.setup(tiny_config(dataset, tmp_path / "out"))
    assert events[:3] == ["loaded, unet on cpu", "caches filled", "unet to device"]


def test_load_leaves_the_unet_on_the_host(monkeypatch):
    """load_base_model moves the VAE and the text encoders, not the UNet (checked on the meta device: a move
    there is visible as meta parameters)."""
    from sdlora.training.base_model import load_base_model

    model = load_base_model(BaseModelConfig(model="tiny"), torch.device("meta"))
    assert {p.device.type for p in model.unet.parameters()} == {"cpu"}
    assert {p.device.type for p in model.pipe.vae.parameters()} == {"meta"}
    assert {p.device.type for e in model.text_encoders.values() for p in e.parameters()} == {"meta"}


# ---------------------------------------------------------------- samples: off, or decoded in tiles


def test_no_samples_keeps_the_held_out_loss(tiny_config, dataset, tmp_path):
    out = tmp_path / "out"
    recipe.train(tiny_config(dataset, out, steps=2, validate_every=1, val_split=0.34, samples=False, checkpoint_every=0))
    assert not (out / "samples").exists()
    logged = [m for m in read_metrics(out / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in logged] == [0, 1, 2]


@pytest.mark.parametrize(
    ("mode", "width", "height", "tiled"),
    [
        ("off", 4096, 4096, False),
        ("on", 64, 64, True),
        ("auto", 1024, 1016, False),
        ("auto", 1024, 1024, True),  # SDXL's own size: its whole decode would be an 8-12 GB card's peak
        ("auto", 1536, 1536, True),
    ],
)
def test_vae_tiling_choice(mode, width, height, tiled):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=32)
    assert width * height >= TILING_FROM_PIXELS or not tiled or mode == "on"
    with decoding_in_tiles(vae, mode, width, height) as used:
        assert used is tiled
        assert vae.use_tiling is tiled and vae.use_slicing is tiled
    assert not vae.use_tiling and not vae.use_slicing  # only for the duration
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (32, 32)  # its own tile size back


def test_sdxl_vae_tiles_at_1024_and_the_decode_peak_falls():
    """diffusers tiles a VAE's decode only beyond its sample_size (1024 for SDXL's: never at 1024 px); tiles of 512 px
    do, and the decode's peak (counted on the meta device) falls from 3 GiB to under a third of it."""
    from sdlora.models.tiny import _sd_vae
    from sdlora.training import memory

    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE layout
    peaks = {}
    for mode in ("off", "on"):
        with decoding_in_tiles(vae, mode, 1024, 1024):
            peaks[mode] = memory._vae_decode_peak(vae, (1024, 1024))
    assert peaks["off"] > 2.9 * 2**30 and peaks["on"] < peaks["off"] / 3
    assert vae.tile_sample_min_size == 1024


def test_samples_decoded_in_tiles(tiny_config, dataset, tmp_path, monkeypatch):
    """--sample-vae-tiling on: the sample grid is drawn with the tiny VAE tiling (its tiles are 32 px, the samples
    96 px), finite and of the right size."""
    from PIL import Image

    out = tmp_path / "out"
    tiled = []
    load = recipe.load_base_model

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        vae_decode = model.pipe.vae.decode

        def decoding(*a, **k):
            tiled.append(model.pipe.vae.use_tiling)
            return vae_decode(*a, **k)

        model.pipe.vae.decode = decoding
        return model

    monkeypatch.setattr(recipe, "load_base_model", loading)
    recipe.train(tiny_config(dataset, out, steps=1, resolution=96, sample_vae_tiling="on", checkpoint_every=0))
    assert tiled and all(tiled)
    with Image.open(out / "samples" / "step-00000001.png") as grid:
        assert grid.size == (96, 96)
        assert grid.getextrema() != ((0, 0), (0, 0), (0, 0))  # not the black cell of a non-finite sample


# ---------------------------------------------------------------- --compile


def test_compile_trains_the_same_lora(tiny_config, dataset, tmp_path, monkeypatch):
    """--compile compiles the UNet in place (Module.compile): same losses, same file keys. Inductor's C++ build
    takes minutes on a CPU (465 s against 13 s for these 3 steps here, identical losses), so the test traces with
    dynamo's eager backend: the graph capture of the LoRA'd UNet, forward and backward, is what it checks."""
    compile_module = torch.nn.Module.compile
    compiled = []

    def eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return compile_module(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager)
    runs = {}
    for compile_ in (False, True):
        out = tmp_path / f"out-{compile_}"
        path = recipe.train(tiny_config(dataset, out, steps=2, compile=compile_, checkpoint_every=0))
        runs[compile_] = ([m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m], load_file(path))
    assert compiled == ["UNet2DConditionModel"]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1].keys() == runs[False][1].keys()
    for key, tensor in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], tensor, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- host synchronisations per step

SYNCING = ("item", "__bool__", "cpu", "tolist", "__float__", "__int__", "numpy", "__index__")


def _count_syncs(monkeypatch, call) -> collections.Counter:
    """Calls of the Tensor methods that wait for the device, by `method file:line` of the caller, during `call()`.
    torch's optimizers read their step counters with .item(): those live on the host (not capturable, not fused),
    so reading them waits for nothing and they are not counted."""
    counts: collections.Counter = collections.Counter()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=3)[-2]
            if "torch/optim/" not in Path(caller.filename).as_posix():
                counts[f"{_name} {Path(caller.filename).name}:{caller.lineno}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    call()
    return counts


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"snr_gamma": 5.0, "loss": "huber", "huber_schedule": "snr", "ema_decay": 0.99, "grad_accum": 2},
        {"loss": "smooth_l1", "huber_schedule": "exponential", "noise_offset": 0.05, "train_text_encoder": True},
    ],
    ids=["plain", "min-snr-huber-ema-accum", "exponential-offset-text-encoder"],
)
def test_one_host_synchronisation_per_step(tiny_config, dataset, tmp_path, monkeypatch, options):
    """A training step reads the device once: the micro-batch losses, the gradient norm and the non-finite flags of
    every process in one .tolist() (_step_numbers). A NaN is still caught at the step it happens: the flags are in
    that one read. (fp16's GradScaler adds its own found-inf read in optimizer.step; that one torch needs.)"""
    run = recipe.setup(tiny_config(dataset, tmp_path / "out", steps=3, **options))
    batches = recipe._Batches(run)
    recipe._optimizer_step(run, batches)  # the first step builds the optimizer state
    with monkeypatch.context() as patch:
        counts = _count_syncs(patch, lambda: recipe._optimizer_step(run, batches))
    assert sum(counts.values()) == 1, counts
    assert next(iter(counts)).startswith("tolist recipe.py")


def test_a_nan_is_caught_at_its_step(tiny_config, dataset, tmp_path, monkeypatch):
    compute = recipe.diffusion_loss
    monkeypatch.setattr(recipe, "diffusion_loss", lambda *a, **k: compute(*a, **k) * float("nan"))
    with pytest.raises(recipe.TrainingDiverged, match="step 1"):
        recipe.train(tiny_config(dataset, tmp_path / "out", steps=3))


def test_train_config_carries_the_new_options():
    config = TrainConfig.from_options(
        data_dir="d", output_dir="o", samples=False, sample_vae_tiling="on", compile=True, tf32=False, workers=0
    )
    assert (config.samples.samples, config.samples.sample_vae_tiling, config.base.compile, config.base.tf32, config.data.workers) == (
        False, "on", True, False, 0,
    )  # fmt: skip
    with pytest.raises(UserError, match="sample-vae-tiling"):
        TrainConfig.from_options(data_dir="d", output_dir="o", sample_vae_tiling="sometimes")
    with pytest.raises(UserError, match="workers"):
        TrainConfig.from_options(data_dir="d", output_dir="o", workers=-1)


# ---------------------------------------------------------------- images loaded ahead (--workers, --cache off)


def test_workers_load_ahead_and_train_the_same_lora(tiny_config, dataset, tmp_path, monkeypatch):
    """Without a latent cache, each step's images and the next step's are loaded on worker threads while the step
    runs: every image a step encodes was loaded off the training thread (after the first step, whose images start
    loading when it does), and the LoRA is bit-identical to loading in the step (--workers 0)."""
    load = cache.load_image
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return load(*args, **kwargs)

    monkeypatch.setattr(cache, "load_image", recording)
    files = {}
    for workers in (0, 2):
        threads.clear()
        options = {"cache": "off", "workers": workers, "grad_accum": 2, "steps": 3, "flip": True, "crop": "random"}
        files[workers] = load_file(recipe.train(tiny_config(dataset, tmp_path / f"out-{workers}", checkpoint_every=0, **options)))
        training = [name for name in threads if name.startswith("sdlora-images") or name == "MainThread"]
        if workers:
            assert training and all(name.startswith("sdlora-images") for name in training), collections.Counter(threads)
        else:
            assert "MainThread" in training and not any(name.startswith("sdlora-images") for name in threads)
    assert files[0].keys() == files[2].keys()
    for key, tensor in files[0].items():
        assert torch.equal(files[2][key], tensor), key


def test_loader_forgets_loads_no_longer_wanted(dataset):
    from sdlora.training.data import find_images

    records = find_images(dataset)
    loader = cache.ImageLoader(records, 2)
    try:
        first = cache.Draw(0, (64, 48), False, (0.5, 0.0, 0.0), "a")
        second = cache.Draw(1, (64, 48), True, (0.5, 0.0, 0.0), "b")
        loader.prefetch([first, second])
        loader.prefetch([second])  # the first is no longer wanted
        assert list(loader.pending) == [second.key]
        pixels, mask = loader(second)  # no loss masks in this set
        assert pixels.shape == (3, 48, 64) and mask is None and not loader.pending
        torch.testing.assert_close(pixels, cache.load_image(records[1], (64, 48), flip=True, window=(0.5, 0.0, 0.0)), rtol=0, atol=0)
    finally:
        loader.close()
