"""fp16 training: the GradScaler's skipped steps (counted, logged, resumed), divergence that stops every process in one
line, and --full-fp16's fp32 master weights. Training on the CPU never gets a scaler from accelerate: the tests put a
real `torch.amp.GradScaler("cpu")` in its place and force gradient overflows on chosen steps."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from sdlora.training import checkpoint, recipe
from sdlora.training.metrics import read_metrics
from sdlora.training.optimizers import Fp32MasterWeights, build_optimizer
from sdlora.training.recipe import TrainingDiverged


def install_scaler(monkeypatch, init_scale: float) -> None:
    """Every accelerator the recipe makes gets a CPU GradScaler, as accelerate gives one on GPUs with fp16."""
    make = recipe._accelerator

    def with_scaler(*args, **kwargs):
        accelerator = make(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)
        accelerator.native_amp = True  # what accelerate sets with its scaler: gradients are unscaled before clipping
        return accelerator

    monkeypatch.setattr(recipe, "_accelerator", with_scaler)


def force_losses(monkeypatch, overflow: set[int] = frozenset(), nan: set[int] = frozenset()) -> None:
    """The loss of the n-th training micro-batch (from 1) gets an inf gradient (`overflow`) or becomes NaN (`nan`)."""
    compute = recipe.diffusion_loss
    calls = []

    def forced(*args, **kwargs):
        loss = compute(*args, **kwargs)
        calls.append(len(calls) + 1)
        if calls[-1] in nan:
            return loss * float("nan")
        if calls[-1] in overflow:
            loss.register_hook(lambda grad: grad * float("inf"))  # a finite loss whose gradients overflow
        return loss

    monkeypatch.setattr(recipe, "diffusion_loss", forced)


def fp16_config(tiny_config, dataset, out, **overrides):
    options = dict(mixed_precision="fp16", batch_size=1, steps=6, checkpoint_every=3, sample_steps=1, lr=1e-3)
    return tiny_config(dataset, out, **{**options, **overrides})


def adam_steps(run) -> set[int]:
    """The step counts AdamW's state holds: one per update it made."""
    return {int(state["step"]) for state in run.optimizer.optimizer.state.values()}


@pytest.mark.slow  # two short runs
def test_overflows_skip_steps_back_off_the_scale_and_resume(dataset, tmp_path, tiny_config, monkeypatch):
    install_scaler(monkeypatch, init_scale=1024.0)
    force_losses(monkeypatch, overflow={2, 3})
    out = tmp_path / "run"
    run = recipe.setup(fp16_config(tiny_config, dataset, out, ema_decay=0.9))
    averaged, update = [], run.ema.update
    run.ema.update = lambda trainable, step: (averaged.append(step), update(trainable, step))
    recipe.run_steps(run)

    rows = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert [row["skipped_steps"] for row in rows] == [0, 1, 2, 2, 2, 2]
    assert [row["grad_norm"] is None for row in rows] == [False, True, True, False, False, False]  # inf is logged as null
    assert run.accelerator.scaler.get_scale() == 256.0  # halved twice
    assert run.lr_scheduler.last_epoch == 4 and adam_steps(run) == {4}  # neither the schedule nor AdamW saw the skips
    assert averaged == [1, 4, 5, 6]  # nor the EMA
    assert all(torch.isfinite(p).all() for p in run.trainable.values())
    saved = json.loads((out / "checkpoints" / "step-00000003" / checkpoint.SCALER_FILE).read_text())
    assert saved["scale"] == 256.0

    # a resume from step 3 picks up the halved scale and the count, not a fresh scaler's
    force_losses(monkeypatch)
    resumed = recipe.setup(fp16_config(tiny_config, dataset, out, ema_decay=0.9, resume="step-00000003"))
    assert resumed.accelerator.scaler.get_scale() == 256.0 and resumed.state.skipped_steps == 2
    recipe.run_steps(resumed)
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert [row["skipped_steps"] for row in rows] == [0, 1, 2, 2, 2, 2]


@pytest.mark.slow  # a short training run
def test_a_collapsed_loss_scale_stops_the_run(dataset, tmp_path, tiny_config, monkeypatch):
    install_scaler(monkeypatch, init_scale=4.0)  # 4, 2, 1, then 0.5: every step overflows
    force_losses(monkeypatch, overflow=set(range(1, 10)))
    with pytest.raises(
        TrainingDiverged,
        match=r"^training stopped at step 3: the fp16 gradients kept overflowing until the loss scale fell to 0.5 \(3 steps skipped\)",
    ) as caught:
        recipe.train(fp16_config(tiny_config, dataset, tmp_path / "run", checkpoint_every=0))
    assert "\n" not in str(caught.value)


@pytest.mark.slow  # a short training run
def test_a_nonfinite_loss_stops_an_fp16_run_in_one_line(dataset, tmp_path, tiny_config, monkeypatch):
    install_scaler(monkeypatch, init_scale=1024.0)
    force_losses(monkeypatch, nan={2})
    with pytest.raises(
        TrainingDiverged, match=r"^training stopped at step 2: the loss became nan; no checkpoint .*Try --mixed-precision bf16"
    ) as caught:
        recipe.train(fp16_config(tiny_config, dataset, tmp_path / "run", checkpoint_every=0))
    assert "\n" not in str(caught.value)


@pytest.mark.slow  # a short training run
def test_without_a_scaler_an_inf_gradient_still_stops_the_run(dataset, tmp_path, tiny_config, monkeypatch):
    force_losses(monkeypatch, overflow={2})
    with pytest.raises(TrainingDiverged, match=r"^training stopped at step 2: the gradient norm became (inf|nan)"):
        recipe.train(tiny_config(dataset, tmp_path / "run", batch_size=1, checkpoint_every=0, sample_steps=1))


def test_checkpoints_keep_the_scaler_and_old_ones_still_load(tmp_path):
    param = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = checkpoint.TrainState(step=5, epoch=0, batch_in_epoch=5, skipped_steps=3)
    state.capture_rngs(random.Random(0), torch.Generator())
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=7)
    scaler.scale(torch.ones(()))  # the scale tensor is made at first use
    scaler.update(new_scale=8.0)
    with_scaler = checkpoint.save_checkpoint(tmp_path / "new", state, {"w": param}, optimizer, scheduler, 1, scaler=scaler)
    without = checkpoint.save_checkpoint(tmp_path / "old", state, {"w": param}, optimizer, scheduler, 1)  # fp32, or before
    assert not (without / checkpoint.SCALER_FILE).exists()

    fresh = torch.amp.GradScaler("cpu", init_scale=64.0)
    loaded = checkpoint.load_checkpoint(with_scaler, {"w": param}, optimizer, scheduler, fresh)
    assert fresh.get_scale() == 8.0 and fresh.get_growth_interval() == 7 and loaded.skipped_steps == 3
    fresh = torch.amp.GradScaler("cpu", init_scale=64.0)
    checkpoint.load_checkpoint(without, {"w": param}, optimizer, scheduler, fresh)
    assert fresh.get_scale() == 64.0  # as it starts
    raw = json.loads((without / checkpoint.STATE_FILE).read_text())
    del raw["skipped_steps"]  # a checkpoint written before the count was kept
    (without / checkpoint.STATE_FILE).write_text(json.dumps(raw))
    marker = json.loads((without / checkpoint.COMPLETE).read_text())
    marker["files"][checkpoint.STATE_FILE] = (without / checkpoint.STATE_FILE).stat().st_size
    (without / checkpoint.COMPLETE).write_text(json.dumps(marker))
    assert checkpoint.load_checkpoint(without, {"w": param}, optimizer, scheduler, fresh).skipped_steps == 0


def test_fp32_master_weights_step_fp16_lora_without_nan():
    """LoRA A's first gradient is exactly 0 (B starts at 0): an fp16 AdamW state makes that 0/0, the fp32 copies do not."""
    torch.manual_seed(0)
    down, up = torch.randn(4, 8).half(), torch.zeros(6, 4, dtype=torch.float16)
    grads = {"down": torch.zeros(4, 8, dtype=torch.float16), "up": torch.randn(6, 4).half() * 1e-3}

    def step(optimizer, params):
        for name, param in params.items():
            param.grad = grads[name].clone()
        optimizer.step()

    plain = {"down": torch.nn.Parameter(down.clone()), "up": torch.nn.Parameter(up.clone())}
    step(build_optimizer("adamw", [{"params": list(plain.values()), "lr": 1e-3}], 1e-3, 0.01), plain)
    assert torch.isnan(plain["down"]).all()  # the bug this guards against

    params = {"down": torch.nn.Parameter(down.clone()), "up": torch.nn.Parameter(up.clone())}

    def build(groups):
        return build_optimizer("adamw", groups, 1e-3, 0.01)

    optimizer = Fp32MasterWeights([{"params": list(params.values()), "lr": 5e-4}], build)
    assert optimizer.param_groups[0]["lr"] == 5e-4 and optimizer.inner.param_groups[0]["eps"] == 1e-8
    step(optimizer, params)
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in params.values())
    assert torch.equal(params["down"], (down.float() * (1 - 5e-4 * 0.01)).half())  # only the weight decay moved A
    masters = optimizer.state_dict()["fp32_master_weights"]
    assert [m.dtype for m in masters] == [torch.float32] * 2 and not torch.equal(masters[1].half().float(), masters[1])

    # a resumed optimizer gets the fp32 weights back, not their fp16 rounding
    again = {"down": torch.nn.Parameter(params["down"].detach().clone()), "up": torch.nn.Parameter(params["up"].detach().clone())}
    restored = Fp32MasterWeights([{"params": list(again.values()), "lr": 5e-4}], build)
    restored.load_state_dict(optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict()["fp32_master_weights"], masters))
    optimizer.param_groups[0]["lr"] = 1e-4  # as a scheduler sets it: the next step uses it
    step(optimizer, params)
    assert optimizer.inner.param_groups[0]["lr"] == 1e-4


@pytest.mark.slow  # 50 steps
def test_full_fp16_trains_fifty_steps_finite(dataset, tmp_path, tiny_config):
    path = recipe.train(
        tiny_config(
            dataset, tmp_path / "run", mixed_precision="fp16", full_fp16=True, steps=50, batch_size=1, checkpoint_every=0, sample_steps=1
        )
    )
    lora = load_file(path)
    assert all(torch.isfinite(tensor).all() for tensor in lora.values())
    assert any(tensor.abs().sum() > 0 for name, tensor in lora.items() if "lora_B" in name or "lora.up" in name)
    rows = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 50 and all(row["grad_norm"] is not None for row in rows)


RUNNER = """
import os, sys
from sdlora.training import recipe

if os.environ["RANK"] == "1":  # this process's second step draws a NaN loss; process 0's stay finite
    compute, calls = recipe.diffusion_loss, []

    def forced(*args, **kwargs):
        calls.append(1)
        loss = compute(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    recipe.diffusion_loss = forced

from sdlora.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # two processes
def test_a_nan_on_one_process_stops_both_in_one_line(dataset, tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(RUNNER))
    out = tmp_path / "ddp"
    options = "--model tiny --steps 4 --resolution 64 --rank 4 --batch-size 1 --sample-steps 1 --checkpoint-every 0 --validate-every 0"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547"]
    command += ["--monitor-interval", "3", str(runner)]  # the launcher kills the rest once one fails: let each say its line
    command += ["train", str(dataset), "--output", str(out), *options.split()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)  # a hang fails here
    assert result.returncode != 0
    stopped = [line for line in result.stderr.splitlines() if "training stopped at step 2" in line]
    assert len(stopped) == 2, result.stderr[-3000:]  # each process says it, in one line
    assert any("the loss became nan on process 1" in line for line in stopped)  # process 1 knows the value
    assert any("the loss became non-finite on process 1" in line for line in stopped)  # process 0 knows where
