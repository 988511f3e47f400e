"""The memory plan printed at the start of training, and --dry-run. The plan against real RSS on SDXL's shapes is a
benchmark (bench/bench_memory_plan.py, figures in docs/benchmarks.md); here: the counting itself on known
computations, the meta trace against the same computation on real tensors, and what each option moves."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from sdlora.training import memory, recipe
from sdlora.training.config import TrainConfig

MIB = 2**20


def test_counting_follows_saved_tensors_through_backward():
    """exp saves its output: three exps hold three outputs until backward; backward adds one gradient at a time."""
    x = torch.empty(MIB // 4, device="meta", requires_grad=True)  # 1 MiB of float32
    with memory.counting() as live:
        a = x.exp()
        b = a.exp()
        c = b.exp()
        total = c.sum()
        del a, b, c
        assert live.live == 3 * MIB + 4  # the three saved outputs and the scalar sum
        held = live.peak
        total.backward(inputs=[x])
    assert held == 3 * MIB + 4
    assert live.peak == 4 * MIB + 8  # one gradient beside the three saved outputs (and the sum's own gradient)


def test_views_and_in_place_results_are_not_new_memory():
    with memory.counting() as live:
        x = torch.empty(1024, 256, device="meta")  # 1 MiB
        x.t()[:10].unsqueeze(0), x.view(-1, 4)[:10]  # views
        x.mul_(2)  # in place
        x.detach()
        assert live.peak == MIB
        x.t().reshape(-1)  # a transposed tensor is copied to be flattened: that one is new memory
    assert live.peak == 2 * MIB and live.live == MIB


def test_the_meta_trace_counts_what_real_tensors_allocate(tiny_pipe):
    """The tiny UNet forward and backward, once on its real weights and once swapped to the meta device: the same
    allocations, so the same peak (attention counted as fused kernels hold it in both)."""
    unet = tiny_pipe.unet.requires_grad_(False)
    unet.conv_in.weight.requires_grad_(True)  # a weight that trains, as a LoRA's would

    def step():
        latents = torch.empty(2, 4, 16, 24, device=unet.conv_in.weight.device)
        prediction = unet(latents.requires_grad_(), torch.tensor([10, 20]), encoder_hidden_states=torch.empty(2, 77, 32))[0]
        prediction.float().pow(2).mean().backward(inputs=[latents])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", memory._fused_attention)
        with memory.counting() as real:
            step()
    with memory.on_meta(unet), memory.counting() as traced:
        step_on_meta(unet)
    assert real.peak > 1e5
    assert traced.peak == pytest.approx(real.peak, rel=0.02)


def step_on_meta(unet):
    latents = memory.meta(2, 4, 16, 24).requires_grad_()
    timesteps = torch.tensor([10, 20], device="meta")
    prediction = unet(latents, timesteps, encoder_hidden_states=memory.meta(2, 77, 32))[0]
    prediction.float().pow(2).mean().backward(inputs=[latents])


def test_on_meta_restores_every_weight_even_after_an_error(tiny_pipe):
    unet = tiny_pipe.unet
    before = {name: p for name, p in unet.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"), memory.on_meta(unet):
        assert all(p.device.type == "meta" for p in unet.parameters())
        raise RuntimeError("inside")
    after = dict(unet.named_parameters())
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert torch.nn.functional.scaled_dot_product_attention is not memory._fused_attention


def test_optimizer_state_by_optimizer():
    params = [torch.zeros(10, 20), torch.zeros(30)]  # 230 fp32 values, 920 bytes
    assert memory.optimizer_bytes("adamw", params) == 2 * 920
    assert memory.optimizer_bytes("lion", params) == 920
    assert memory.optimizer_bytes("prodigy", params) == 4 * 920
    assert memory.optimizer_bytes("adamw8bit", params) == 2 * 230
    assert memory.optimizer_bytes("adafactor", params) == (10 + 20 + 30) * 4
    half = [p.half() for p in params]  # --full-fp16: fp32 state and an fp32 copy of the weights
    assert memory.optimizer_bytes("adamw", half, fp32_master=True) == 2 * 920 + 920


def _plan(tiny_config, dataset, tmp_path, **options) -> memory.MemoryPlan:
    run = recipe.setup(tiny_config(dataset, tmp_path / "out", dry_run=True, **options))
    assert run is None
    return _last_plan


_last_plan: memory.MemoryPlan | None = None


@pytest.fixture(autouse=True)
def _keep_plans(monkeypatch):
    plan_memory = memory.plan_memory

    def keeping(*args, **kwargs):
        global _last_plan
        _last_plan = plan_memory(*args, **kwargs)
        return _last_plan

    monkeypatch.setattr(memory, "plan_memory", keeping)


def test_the_plan_counts_the_loaded_weights(tiny_config, dataset, tmp_path):
    plan = _plan(tiny_config, dataset, tmp_path, rank=4)
    from sdlora.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    step = plan.phase("training step").parts
    assert step["UNet"] == sum(p.nelement() * 4 for p in pipe.unet.parameters()) + sum(b.nelement() * 4 for b in pipe.unet.buffers())
    assert step["LoRA + gradients"] == 2 * 4 * sum(  # rank 4 on every attention projection: (in + out) x 4 per layer, fp32
        4 * (m.in_features + m.out_features)
        for name, m in pipe.unet.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
    )
    assert step["adamw state"] == step["LoRA + gradients"]  # two fp32 states per weight = weight + gradient bytes
    assert step["activations"] > 0 and plan.peak == max(p.total for p in plan.phases)


def test_what_the_options_move(tiny_config, dataset, tmp_path):
    base = _plan(tiny_config, dataset, tmp_path / "a")
    step = base.phase("training step")
    checkpointed = _plan(tiny_config, dataset, tmp_path / "b", gradient_checkpointing=True).phase("training step")
    assert checkpointed.parts["activations"] < step.parts["activations"]
    bigger = _plan(tiny_config, dataset, tmp_path / "c", batch_size=4).phase("training step")
    assert bigger.parts["activations"] > 1.5 * step.parts["activations"]
    fp8 = _plan(tiny_config, dataset, tmp_path / "d", fp8_base=True, mixed_precision="bf16")
    bf16 = _plan(tiny_config, dataset, tmp_path / "e", mixed_precision="bf16")
    assert fp8.phase("training step").parts["UNet"] < 0.6 * bf16.phase("training step").parts["UNet"]
    no_samples = _plan(tiny_config, dataset, tmp_path / "f", samples=False)
    assert [p.name for p in no_samples.phases] == ["setup (caching)", "training step"]
    uncached = _plan(tiny_config, dataset, tmp_path / "g", cache="off")
    assert [p.name for p in uncached.phases] == ["training step", "sampling"]  # nothing to fill before the steps
    text = _plan(tiny_config, dataset, tmp_path / "h", train_text_encoder=True).phase("training step")
    assert text.parts["LoRA + gradients"] > step.parts["LoRA + gradients"]


def test_the_table_names_every_phase_and_warns_when_it_will_not_fit():
    plan = memory.MemoryPlan(
        torch.device("cuda", 0),
        [memory.Phase("training step", {"UNet": 5 * 2**30, "activations": 6 * 2**30}), memory.Phase("sampling", {"UNet": 5 * 2**30})],
        "1024x1024, batch 1",
        capacity=8 * 2**30,
    )
    table = plan.table()
    assert "training step" in table and "11.00" in table and "sampling" in table
    assert "will not fit in 8.0 GiB" in table and "--gradient-checkpointing" in table
    plan.capacity = 24 * 2**30
    assert "will not fit" not in plan.table()


def test_dry_run_prints_the_plan_and_writes_nothing(dataset, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "sdlora", "train", str(dataset), "--output", str(out), "--model", "tiny", "--resolution", "64", "--dry-run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "memory plan (cpu; 64x64, batch 1" in done.stdout + done.stderr
    assert "training step" in done.stdout + done.stderr and "dry run" in done.stdout
    assert not out.exists()


def test_a_cpu_run_plans_only_when_asked(tiny_config, dataset, tmp_path, capsys):
    run = recipe.setup(tiny_config(dataset, tmp_path / "out", steps=1))
    assert run.plan is None and "memory plan" not in capsys.readouterr().out  # seconds of meta kernels, for nothing
    run = recipe.setup(tiny_config(dataset, tmp_path / "out-2", steps=1, dry_run=True))
    assert run is None and "memory plan (cpu" in capsys.readouterr().out


def test_train_config_carries_dry_run():
    assert TrainConfig.from_options(data_dir="d", output_dir="o", dry_run=True).run.dry_run


@pytest.mark.slow  # three traces of SD3.5 Medium's 2.2 B-parameter transformer (on the meta device)
def test_sd3_plan_traces_sd35_mediums_transformer_on_the_meta_device():
    from sdlora.core.families import SD3
    from sdlora.models.tiny import build_sd3_shaped_pipeline
    from sdlora.training.base_model import BaseModel

    pipe = build_sd3_shaped_pipeline(meta=True)
    encoders = {c: getattr(pipe, c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    for part in (pipe.transformer, pipe.vae, *encoders.values()):
        part.requires_grad_(False)  # frozen, as load_base_model leaves them
    model = BaseModel("sd3-shaped", pipe, SD3, torch.bfloat16, torch.device("cuda"), pipe.transformer, encoders, None, ("transformer",))

    def plan(size: int, **options) -> memory.MemoryPlan:
        config = TrainConfig.from_options(data_dir="d", output_dir="o", mixed_precision="bf16", **options)
        return memory.plan_memory(config, model, (size, size), 1, torch.device("cuda"), latents_cached=True, captions_cached=True)

    small = plan(256, gradient_checkpointing=False)
    step = small.phase("training step").parts
    weights = sum(p.nelement() * 2 for p in pipe.transformer.parameters())  # 2.24 B parameters in bf16
    pos_embed = pipe.transformer.pos_embed.pos_embed  # SD3's fp32 table of positions (384 x 384 x 1536): 0.84 GiB more
    assert step["transformer"] == weights + pos_embed.nelement() * 4 and weights > 4 * 2**30
    assert "text encoders" not in step and "VAE" not in step  # both cached: off the accelerator while the steps run
    assert step["activations"] > 0 and small.phase("sampling").parts["denoise / decode"] > 0
    larger = plan(384, gradient_checkpointing=False).phase("training step").parts["activations"]
    pipe.transformer.enable_gradient_checkpointing()  # as _setup_network does for --gradient-checkpointing
    checkpointed = plan(256, gradient_checkpointing=True).phase("training step").parts["activations"]
    assert larger > 1.8 * step["activations"]  # 2.25x the image tokens (the text's 333 stay)
    assert checkpointed < step["activations"] / 3  # only the blocks' inputs kept, one block recomputed at a time


def test_sd3_dry_run_prints_the_plan(tiny_config, dataset, tmp_path, capsys):
    run = recipe.setup(tiny_config(dataset, tmp_path / "out", model="tiny-sd3", dry_run=True))
    out = capsys.readouterr().out
    assert run is None and "memory plan (cpu" in out and "transformer" in out and "training step" in out
    assert _last_plan.phase("training step").parts["activations"] > 0
