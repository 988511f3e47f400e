"""kohya's conv_dim/conv_alpha (`--conv-rank`, `--conv-alpha`) and the EMA of the LoRA weights (`--ema-decay`) (#15)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdlora.core.files import read_lora
from sdlora.training import recipe
from sdlora.training.ema import LoraEma


def test_conv_rank_and_alpha_set_the_3x3_convs_only(dataset, tmp_path, tiny_config):
    out = recipe.train(tiny_config(dataset, tmp_path / "out", preset="all", rank=4, alpha=8.0, conv_rank=2, conv_alpha=3.0, steps=2))
    state = read_lora(out)
    convs = {p: m for p, m in state.modules.items() if m.down.ndim == 4 and m.down.shape[-1] == 3}
    others = {p: m for p, m in state.modules.items() if p not in convs}
    assert convs and others
    assert {(m.rank, m.alpha) for m in convs.values()} == {(2, 3.0)}
    assert {(m.rank, m.alpha) for m in others.values()} == {(4, 8.0)}  # 1x1 convs too: they are linear layers
    kohya = tmp_path / "out" / "lora.safetensors"
    assert read_lora(kohya).modules.keys() == state.modules.keys()
    for path, module in read_lora(kohya).modules.items():
        torch.testing.assert_close(module.delta(), state.modules[path].delta())  # both files, the same update
    args = json.loads(safe_open(str(kohya), "pt").metadata()["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("2", "3")


def test_conv_rank_needs_the_all_preset(dataset, tmp_path, tiny_config):
    with pytest.raises(ValueError, match="only --preset all"):
        tiny_config(dataset, tmp_path / "out", preset="attn", conv_rank=2)


def test_ema_follows_diffusers_warmup_and_formula():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEma({"p": param}, decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 30):
        with torch.no_grad():
            param.add_(1.0)
        ema.update({"p": param}, step)
        decay = min(0.9, (1 + step) / (10 + step))  # diffusers EMAModel.get_decay without warm-up power
        expected = decay * expected + (1 - decay) * param.detach()
    torch.testing.assert_close(ema.shadow["p"], expected)
    with ema.applied({"p": param}):
        torch.testing.assert_close(param.detach(), expected)
    assert torch.equal(param.detach(), torch.full((3,), 29.0))  # the trained weights are back


@pytest.mark.slow
def test_ema_files_are_written_and_resume_keeps_the_average(dataset, tmp_path, tiny_config):
    whole = recipe.train(tiny_config(dataset, tmp_path / "whole", steps=4, checkpoint_every=2, ema_decay=0.8))
    folder = whole.parent
    ema_file, name = folder / "pytorch_lora_weights_ema.safetensors", folder / "lora_ema.safetensors"
    assert ema_file.is_file() and name.is_file()
    trained, averaged = read_lora(whole), read_lora(ema_file)
    assert trained.modules.keys() == averaged.modules.keys()
    assert any(not torch.equal(trained.modules[p].up, averaged.modules[p].up) for p in trained.modules)
    assert safe_open(str(name), "pt").metadata()["ss_output_name"].endswith("_ema")
    # killed after step 2, resumed: the same LoRA and the same average, bit for bit
    part = tmp_path / "part"
    recipe.train(tiny_config(dataset, part, steps=2, checkpoint_every=2, ema_decay=0.8))
    resumed = recipe.train(tiny_config(dataset, part, steps=4, checkpoint_every=2, ema_decay=0.8, resume="latest"))
    for ours, theirs in ((resumed, whole), (part / ema_file.name, ema_file)):
        a, b = read_lora(ours), read_lora(theirs)
        assert all(torch.equal(a.modules[p].up, b.modules[p].up) and torch.equal(a.modules[p].down, b.modules[p].down) for p in a.modules)


def test_full_bf16_needs_bf16_autocast(dataset, tmp_path, tiny_config):
    with pytest.raises(ValueError, match="--full-bf16 needs --mixed-precision bf16"):
        tiny_config(dataset, tmp_path / "out", full_bf16=True, mixed_precision="fp16")
    assert tiny_config(dataset, tmp_path / "out", full_bf16=True).base.mixed_precision == "auto"  # bf16 when it runs
    with pytest.raises(ValueError, match="choose one"):
        tiny_config(dataset, tmp_path / "out", full_bf16=True, full_fp16=True, mixed_precision="bf16")


@pytest.mark.slow
def test_full_bf16_trains_bf16_weights_and_resumes_bit_for_bit(dataset, tmp_path, tiny_config):
    options = dict(mixed_precision="bf16", full_bf16=True, checkpoint_every=2)
    run = recipe.setup(tiny_config(dataset, tmp_path / "probe", steps=1, **options))
    assert {p.dtype for p in run.trainable.values()} == {torch.bfloat16}
    recipe.run_steps(run)
    state = next(iter(run.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and all(p.grad is None for p in run.trainable.values())
    whole = recipe.train(tiny_config(dataset, tmp_path / "whole", steps=4, **options))
    recipe.train(tiny_config(dataset, tmp_path / "part", steps=2, **options))
    resumed = recipe.train(tiny_config(dataset, tmp_path / "part", steps=4, resume="latest", **options))
    a, b = read_lora(whole), read_lora(resumed)
    assert all(torch.equal(a.modules[p].up, b.modules[p].up) for p in a.modules)
    assert any(a.modules[p].up.abs().sum() > 0 for p in a.modules)  # it trained
    metadata = safe_open(str(tmp_path / "whole" / "lora.safetensors"), "pt").metadata()
    assert metadata["ss_full_bf16"] == "True" and metadata["ss_mixed_precision"] == "bf16"
