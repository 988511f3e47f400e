"""convert --rank, resize and combine: exact where they should be, and the error they report is the error measured
on merged weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from sdlora.cli import _parse_dynamic, main
from sdlora.core import formats
from sdlora.core.families import SD1
from sdlora.core.files import read_lora, write_kohya
from sdlora.core.kinds import DoraModule, FullModule, LohaModule, LokrModule, OftModule
from sdlora.core.lowrank import dynamic_rank, factor
from sdlora.core.state import LoraModule, LoraState
from sdlora.inference.merge import merge_lora
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.tools.rerank import combine_loras, resize_lora, to_plain_lora

UNET = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
CONV = "unet.down_blocks.1.resnets.0.conv1"  # 3x3, 32 -> 64


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _merged(state: LoraState, scale: float = 1.0) -> dict[str, torch.Tensor]:
    pipe = build_tiny_pipeline()
    merge_lora(pipe, [(state, scale)])
    return _weights(pipe)


def _mixed_kinds() -> LoraState:
    """One module per kind, on attention layers (64 wide) and a 3x3 conv; LoHa on the conv keeps its kernel flattened."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(shape, generator=g) * 0.1

    return LoraState({
        f"{UNET}.attn1.to_q": LohaModule(rand(64, 4), rand(4, 64), rand(64, 4), rand(4, 64), alpha=2.0),
        f"{UNET}.attn1.to_k": LokrModule(w1=rand(4, 4), w2a=rand(16, 3), w2b=rand(3, 16), alpha=1.5),
        f"{UNET}.attn1.to_v": FullModule(rand(64, 64)),
        f"{UNET}.attn1.to_out.0": LoraModule(rand(6, 64), rand(64, 6), alpha=3.0),
        CONV: LohaModule(rand(64, 2), rand(2, 32 * 9), rand(64, 2), rand(2, 32 * 9), alpha=1.0),
    })  # fmt: skip


def _measured_error(reference: dict, approximate: dict, base: dict) -> dict[str, float]:
    """Per component: ||merged approximate - merged reference|| / ||merged reference - base|| over all weights."""
    dropped, whole = {}, {}
    for key, value in reference.items():
        component = key.partition(".")[0]
        dropped[component] = dropped.get(component, 0.0) + float((approximate[key] - value).pow(2).sum())
        whole[component] = whole.get(component, 0.0) + float((value - base[key]).pow(2).sum())
    return {c: math.sqrt(dropped[c] / whole[c]) for c in whole if whole[c] > 0}


def test_every_additive_kind_at_full_rank_is_exact_and_at_low_rank_reports_the_measured_error():
    state = _mixed_kinds()
    reference, base = _merged(state), _weights(build_tiny_pipeline())
    exact, report = to_plain_lora(state, rank=64, conv_rank=64)
    # the LoHa's kernel unflattened; its update has rank dim^2 = 4, so 4 columns hold it exactly
    assert exact.kinds() == ["lora"] and exact.modules[CONV].down.shape == (4, 32, 3, 3)
    assert all(error < 1e-5 for error in report.component_errors().values())
    merged = _merged(exact)
    assert max(float((merged[k] - v).abs().max() / (v - base[k]).abs().max().clamp_min(1e-12)) for k, v in reference.items() if not torch.equal(v, base[k])) < 1e-5  # fmt: skip
    low, report = to_plain_lora(state, rank=3, conv_rank=2)
    assert {path: m.rank for path, m in low.modules.items()}[CONV] == 2 and low.modules[f"{UNET}.attn1.to_q"].rank == 3
    measured = _measured_error(reference, _merged(low), base)
    assert report.component_errors()["unet"] == pytest.approx(measured["unet"], rel=1e-3) and measured["unet"] > 0.05
    worst_path, worst = report.worst()
    assert worst_path in state.modules and worst.error == max(e.error for e in report.modules.values())


def test_a_lora_of_lower_rank_is_kept_exactly_and_a_tucker_conv_has_its_core_folded_in():
    g = torch.Generator().manual_seed(1)
    tucker = LoraModule(
        torch.randn(2, 32, 1, 1, generator=g), torch.randn(64, 2, 1, 1, generator=g), 3.0, torch.randn(2, 2, 3, 3, generator=g)
    )
    plain = LoraModule(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 2.0)
    state = LoraState({CONV: tucker, f"{UNET}.attn1.to_q": plain})
    converted, report = to_plain_lora(state, rank=8)
    assert converted.modules[f"{UNET}.attn1.to_q"] is plain
    assert converted.modules[CONV].mid is None and converted.modules[CONV].down.shape == (2, 32, 3, 3)
    torch.testing.assert_close(converted.modules[CONV].delta(), tucker.delta())
    assert all(entry.error == 0.0 for entry in report.modules.values())


def test_dora_and_oft_are_factored_on_the_model_weights():
    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(3)
    state = LoraState({
        f"{UNET}.attn1.to_q": DoraModule(LoraModule(torch.randn(2, 64, generator=g) * 0.1, torch.randn(64, 2, generator=g) * 0.1, 1.0), torch.rand(64, 1, generator=g) + 0.5),
        f"{UNET}.attn1.to_k": OftModule(torch.randn(8, 8, 8, generator=g) * 0.1, None, 0.0),
    })  # fmt: skip
    with pytest.raises(ValueError, match="is DoRA, whose update depends on the weight it adapts: give --model"):
        to_plain_lora(state, rank=64)
    weights = {path: pipe.unet.get_submodule(path.removeprefix("unet.")).weight.detach() for path in state.modules}
    converted, report = to_plain_lora(state, rank=64, weights=weights)
    reference, merged = _merged(state), _merged(converted)
    for path in state.modules:
        key = path + ".weight"
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6)
    assert all(error < 1e-5 for error in report.component_errors().values())


def test_resize_to_the_same_rank_is_lossless_and_lower_reports_the_measured_error(lora_state):
    same, report = resize_lora(lora_state, rank=4)
    assert all(same.modules[p] is m for p, m in lora_state.modules.items())
    base, reference = _weights(build_tiny_pipeline()), _merged(lora_state)
    smaller, report = resize_lora(lora_state, rank=2)
    assert smaller.ranks() == [2] and {m.scale for m in smaller.modules.values()} == {2.0}  # alpha/rank kept: 8/4
    measured = _measured_error(reference, _merged(smaller), base)
    for component, error in report.component_errors().items():
        assert error == pytest.approx(measured[component], rel=1e-3), component
    dynamic, report = resize_lora(lora_state, rank=3, dynamic=("sv_fro", 0.5))
    assert set(dynamic.ranks()) <= {1, 2, 3} and all(entry.energy >= 0.5 - 1e-6 for entry in report.modules.values())


def test_the_dynamic_rank_rules_are_kohyas():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert dynamic_rank(s, "sv_ratio", 4) == 2  # above 10 / 4
    assert dynamic_rank(s, "sv_cumulative", 0.8) == 2  # 15 / 18.5 = 0.81
    assert dynamic_rank(s, "sv_fro", 0.85) == 1  # sqrt(100 / 130.25) = 0.876 >= 0.85
    assert dynamic_rank(s, "sv_fro", 0.9) == 2  # 0.876 < 0.9 <= sqrt(125 / 130.25) = 0.980
    assert dynamic_rank(s, "sv_fro", 0.99) == 3
    assert dynamic_rank(s, "sv_ratio", 1000) == 5
    with pytest.raises(ValueError, match="sv_ratio takes a ratio above 1"):
        dynamic_rank(s, "sv_ratio", 0.5)


@pytest.mark.parametrize(
    "method, value, says",
    [("sv_ratio", math.nan, "ratio above 1, and finite"), ("sv_ratio", math.inf, "ratio above 1, and finite"),
     ("sv_fro", math.nan, "share between 0 and 1"), ("sv_cumulative", 0.0, "share between 0 and 1"), ("sv_fro", 2.0, "share between 0 and 1")],
)  # fmt: skip
def test_dynamic_values_outside_their_range_are_refused_not_cut_to_rank_1(method, value, says):
    with pytest.raises(ValueError, match=says):
        dynamic_rank(torch.tensor([10.0, 5.0, 2.0]), method, value)
    with pytest.raises(ValueError, match=rf"--dynamic {method}:{value}: .*{says}"):
        _parse_dynamic(f"{method}:{value}")


def test_combine_refuses_absurd_weights_and_factoring_refuses_nan(lora_state):
    with pytest.raises(ValueError, match=r"first: a LoRA weight must be a finite number between -100 and 100, got 1e\+300"):
        combine_loras([("first", lora_state, 1e300), ("second", lora_state, 1.0)], rank=2)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        factor(torch.tensor([[1.0, math.inf], [0.0, 1.0]]), 1)


def test_clamping_is_measured_not_assumed():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(32, 40, generator=g)
    delta[0, 0] = 50.0  # an outlier the clamp cuts
    clamped = factor(delta, 32, clamp_quantile=0.9)
    measured = float(torch.linalg.matrix_norm(delta - clamped.module.delta()) / torch.linalg.matrix_norm(delta))
    assert clamped.error == pytest.approx(measured, rel=1e-4) and clamped.error > 0.01


def test_combine_side_by_side_equals_merging_one_after_another(tiny_pipe, random_lora_state):
    first = random_lora_state(tiny_pipe, rank=4, alpha=2.0, seed=1)
    second = random_lora_state(tiny_pipe, rank=2, alpha=3.0, seed=2, unet_targets=("to_q", "ff.net.2"), text_encoder=False)
    combined, report = combine_loras([("a", first, 0.7), ("b", second, -0.4)])
    assert report is None and combined.ranks() == [2, 4, 6]
    pipe = build_tiny_pipeline()
    merge_lora(pipe, [(first, 0.7)])
    merge_lora(pipe, [(second, -0.4)])
    expected, ours = _weights(pipe), _merged(combined)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6)
    at_rank, report = combine_loras([("a", first, 0.7), ("b", second, -0.4)], rank=6)
    assert all(error < 1e-5 for error in report.component_errors().values())
    loha = LoraState({f"{UNET}.attn1.to_q": _mixed_kinds().modules[f"{UNET}.attn1.to_q"]})
    with pytest.raises(ValueError, match="is LoHa: combining without --rank joins LoRA modules side by side"):
        combine_loras([("a", first, 1.0), ("loha.safetensors", loha, 1.0)])


def test_cli_convert_resize_combine_write_files_and_refuse_in_one_line(tmp_path, lora_state, capsys):
    kinds = tmp_path / "kinds.safetensors"
    save_file(formats.to_kohya(_mixed_kinds(), SD1), str(kinds))
    assert main(["convert", str(kinds), str(tmp_path / "x.safetensors"), "--to", "diffusers"]) == 2
    assert "convert it to a LoRA with --rank" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(["convert", str(kinds), str(tmp_path / "plain.safetensors"), "--to", "diffusers", "--rank", "4", "--conv-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "unet: 5 modules at rank 2-4, relative error" in out and "worst module: unet." in out
    assert read_lora(tmp_path / "plain.safetensors").kinds() == ["lora"]
    assert main(["resize", str(kinds), "--rank", "2", "--out", str(tmp_path / "r.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "kinds.safetensors: module unet." in err[0]
        and "resize takes LoRA files; `sdlora convert --rank R` makes a LoRA of it" in err[0]
    )
    assert not (tmp_path / "r.safetensors").exists()
    lora_file = write_kohya(lora_state, tmp_path / "lora.safetensors")
    assert main(["resize", str(lora_file), "--dynamic", "sv_fro:0.9", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert "energy kept (Frobenius): mean" in capsys.readouterr().out and (tmp_path / "r.safetensors").is_file()
    assert main(["resize", str(lora_file), "--dynamic", "sv_frob:0.9", "--out", str(tmp_path / "s.safetensors")]) == 2
    assert "METHOD one of sv_ratio, sv_fro, sv_cumulative" in capsys.readouterr().err
    assert main(["combine", f"{lora_file}:0.5", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "c.safetensors")]) == 0
    assert "joined exactly" in capsys.readouterr().out and read_lora(tmp_path / "c.safetensors").kinds() == ["lora"]
