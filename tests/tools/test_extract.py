"""extract: from (base, base + a known LoRA's update) it recovers that update at its rank."""

from __future__ import annotations

import pytest
import torch

from sdlora.cli import main
from sdlora.core.files import read_lora
from sdlora.core.state import LoraModule, LoraState
from sdlora.inference.merge import merge_model
from sdlora.tools.extract import extract_lora

CONV = "unet.down_blocks.1.resnets.0.conv1"  # 3x3


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    """(the LoRA merged, a copy of the tiny model with it merged): rank 4 on the UNet's attention and feed-forward
    and the text encoder's attention, rank 2 on a 3x3 conv; alpha != rank."""
    from sdlora.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(11)
    modules = {}
    for component, model, endings in (
        ("unet", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")),
        ("text_encoder", pipe.text_encoder, ("q_proj", "v_proj")),
    ):
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(endings):
                path = name if component == "unet" or name.startswith("text_model.") else "text_model." + name
                down, up = torch.randn(4, layer.in_features, generator=g) * 0.2, torch.randn(layer.out_features, 4, generator=g) * 0.2
                modules[f"{component}.{path}"] = LoraModule(down, up, alpha=2.0)
    modules[CONV] = LoraModule(torch.randn(2, 32, 3, 3, generator=g) * 0.2, torch.randn(64, 2, 1, 1, generator=g) * 0.2, alpha=3.0)
    state = LoraState(modules)
    return state, merge_model(tiny_model_dir, [(state, 1.0)], out_dir=tmp_path_factory.mktemp("tuned") / "model")


def test_extract_recovers_the_merged_update_at_its_rank(tiny_model_dir, tuned):
    state, tuned_dir = tuned
    extracted, report, family = extract_lora(str(tiny_model_dir), str(tuned_dir), 4, conv_rank=2, clamp_quantile=1.0, min_diff=0.0)
    assert family.label == "SD1.x" and set(extracted.modules) == set(state.modules)
    assert extracted.modules[CONV].rank == 2 and extracted.modules[CONV].down.shape == (2, 32, 3, 3)
    for path, module in state.modules.items():
        expected = module.delta()
        torch.testing.assert_close(extracted.modules[path].delta(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert all(error < 1e-4 for error in report.component_errors().values())
    assert "layers are the same in both models: left out" in " ".join(report.notes)  # the layers the LoRA left alone


def test_a_lower_rank_reports_the_error_it_leaves_and_an_unchanged_text_encoder_is_left_out(tiny_model_dir, tmp_path, tuned):
    state, _ = tuned
    unet_only = LoraState({p: m for p, m in state.modules.items() if p.startswith("unet.")})
    tuned_dir = merge_model(tiny_model_dir, [(unet_only, 1.0)], out_dir=tmp_path / "tuned")
    extracted, report, _ = extract_lora(str(tiny_model_dir), str(tuned_dir), 2, clamp_quantile=1.0)
    assert extracted.components() == ["unet"] and extracted.ranks() == [2]
    assert any(note.startswith("text_encoder: unchanged (largest difference 0 <= --min-diff 0.01)") for note in report.notes)
    dropped = sum(float((state.modules[p].delta() - m.delta()).pow(2).sum()) for p, m in extracted.modules.items())
    whole = sum(float(state.modules[p].delta().pow(2).sum()) for p in extracted.modules)
    assert report.component_errors()["unet"] == pytest.approx((dropped / whole) ** 0.5, rel=1e-3)


def test_cli_extract_writes_kohya_and_refuses_models_of_two_architectures(tiny_model_dir, tuned, tmp_path, capsys):
    _, tuned_dir = tuned
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), "--rank", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unet: " in printed and "text_encoder: " in printed and f"as kohya to {out}" in printed
    assert read_lora(out).metadata["sdlora_format"] == "kohya"
    bad = tmp_path / "bad.safetensors"
    assert main(["extract", "--base", str(tiny_model_dir), "--tuned", "tiny-sdxl", "--rank", "4", "--out", str(bad)]) == 2
    err = capsys.readouterr().err  # after diffusers' own loading bars: one error line
    last = err.strip().splitlines()[-1]
    assert (
        "Traceback" not in err
        and last.startswith("sdlora extract: error: the base model is SD1.x")
        and "the fine-tuned one is SDXL" in last
    )
    assert not bad.exists()
