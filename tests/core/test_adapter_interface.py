"""Every adapter kind is a `core.state.Adapter` and answers each of its members truthfully: the kinds are found by
looking through `core.kinds`, so a new kind without the interface (or without an example here) fails."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from sdlora.core import kinds
from sdlora.core.state import Adapter, LoraModule, LoraState
from sdlora.errors import UserError


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# small modules of every kind: asymmetric shapes (7 or 8 output rows, 5 input columns), alpha != rank
EXAMPLES: dict[str, Adapter] = {
    "lora": LoraModule(_randn(3, 5, seed=1), _randn(7, 3, seed=2), alpha=1.5),
    "lora-tucker-conv": LoraModule(_randn(3, 5, 1, 1, seed=3), _randn(7, 3, 1, 1, seed=4), alpha=6.0, mid=_randn(3, 3, 3, 3, seed=5)),
    "loha": kinds.LohaModule(_randn(7, 2, seed=6), _randn(2, 5, seed=7), _randn(7, 2, seed=8), _randn(2, 5, seed=9), alpha=3.0),
    "loha-tucker": kinds.LohaModule(
        _randn(2, 7, seed=10),
        _randn(2, 5, seed=11),
        _randn(2, 7, seed=12),
        _randn(2, 5, seed=13),
        alpha=0.5,
        t1=_randn(2, 2, 3, 3, seed=14),
        t2=_randn(2, 2, 3, 3, seed=15),
    ),
    "lokr": kinds.LokrModule(w1=_randn(2, 1, seed=16), w2=_randn(4, 5, seed=17)),
    "lokr-factored-tucker": kinds.LokrModule(
        w1a=_randn(2, 1, seed=18),
        w1b=_randn(1, 1, seed=19),
        w2a=_randn(2, 4, seed=20),
        w2b=_randn(2, 5, seed=21),
        t2=_randn(2, 2, 3, 3, seed=22),
        alpha=0.5,
    ),
    "full": kinds.FullModule(_randn(7, 5, seed=23) * 0.1),
    "full-with-bias": kinds.FullModule(_randn(7, 5, seed=24) * 0.1, _randn(7, seed=25)),
    "dora": kinds.DoraModule(LoraModule(_randn(3, 5, seed=26), _randn(7, 3, seed=27), alpha=1.5), _randn(7, 1, seed=28).abs() + 1),
    "dora-loha-on-input": kinds.DoraModule(
        kinds.LohaModule(_randn(7, 2, seed=29), _randn(2, 5, seed=30), _randn(7, 2, seed=31), _randn(2, 5, seed=32), alpha=4.0),
        _randn(1, 5, seed=33).abs() + 1,
    ),
    "oft": kinds.OftModule(_randn(2, 4, 4, seed=34) * 0.1, _randn(8, 1, seed=35).abs() + 0.5, alpha=0.01),
    "boft": kinds.BoftModule(_randn(2, 2, 4, 4, seed=36) * 0.1, None, alpha=0.0),
    "ia3": kinds.Ia3Module(_randn(7, seed=37), torch.tensor(False)),
    "ia3-on-input": kinds.Ia3Module(_randn(5, seed=38), torch.tensor(True)),
    "glora": kinds.GloraModule(_randn(5, 2, seed=39), _randn(2, 5, seed=40), _randn(7, 2, seed=41), _randn(2, 5, seed=42), alpha=3.0),
}
INPUT_WIDTH = 5  # the base weights' width where a kind takes the layer's (OFT, IA3 on output rows)


def _kind_classes() -> set[type]:
    """Every class `core.kinds` defines as a dataclass (each adapter kind is one), and LoRA's."""
    found = {
        cls for cls in vars(kinds).values() if inspect.isclass(cls) and cls.__module__ == kinds.__name__ and dataclasses.is_dataclass(cls)
    }
    return found | {LoraModule}


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor a module's fields hold, through an inner adapter (a DoRA's)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Adapter):
        return [t for field in dataclasses.fields(value) for t in _tensors(getattr(value, field.name))]
    return []


def _base_weight(module: Adapter, seed: int = 100) -> torch.Tensor:
    shape = tuple(INPUT_WIDTH if size is None else size for size in module.weight_shape())
    return _randn(*shape, seed=seed)


def test_every_kind_class_is_an_adapter_with_an_example():
    classes = _kind_classes()
    assert set(kinds.KIND_CLASSES.values()) | {kinds.DoraModule} <= classes  # discovery finds at least the known kinds
    for cls in classes:
        assert issubclass(cls, Adapter), f"{cls.__name__} is not a core.state.Adapter"
        assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} unanswered"
    covered = {type(module) for module in EXAMPLES.values()}
    assert classes <= covered, f"no example of {sorted(c.__name__ for c in classes - covered)} in EXAMPLES"
    assert {module.kind for module in EXAMPLES.values()} == set(kinds.KIND_NAMES)


def test_a_kind_missing_a_member_cannot_be_built():
    class NoBias(LoraModule):
        bias_update = Adapter.bias_update  # the abstract one: this kind does not say whether it changes the bias

    with pytest.raises(TypeError, match="bias_update"):
        NoBias(torch.zeros(1, 2), torch.zeros(3, 1))


@pytest.mark.parametrize("name", EXAMPLES)
def test_class_level_answers_and_scale(name):
    module = EXAMPLES[name]
    assert module.kind in kinds.KIND_NAMES and isinstance(module.additive, bool) and isinstance(module.by_rows, bool)
    assert module.rank is None or (isinstance(module.rank, int) and module.rank > 0)
    assert isinstance(module.scale, float)
    if module.rank is not None:
        assert module.effective_alpha is not None and module.effective_alpha != module.rank  # the examples' alpha is not their rank
        assert module.scale == pytest.approx(module.effective_alpha / module.rank)
    elif module.kind not in ("oft", "boft", "dora"):  # OFT's alpha is a constraint, not a scale
        assert module.alpha is None and module.effective_alpha is None and module.scale == 1.0


@pytest.mark.parametrize("name", EXAMPLES)
def test_parameter_count_is_every_tensor_it_holds(name):
    module = EXAMPLES[name]
    held = _tensors(module)
    assert module.parameter_count() == sum(t.numel() for t in held) == sum(t.numel() for t in module.factors().values())
    assert {id(t) for t in module.factors().values()} <= {id(t) for t in held}


@pytest.mark.parametrize("name", EXAMPLES)
def test_apply_and_delta(name):
    module = EXAMPLES[name]
    weight = _base_weight(module)
    assert module.fits(tuple(weight.shape))
    merged = module.apply(weight.clone(), 0.7)
    assert merged.shape == weight.shape and bool(torch.isfinite(merged).all()) and not torch.equal(merged, weight)
    assert torch.equal(module.apply(weight.clone(), 0.0), weight)  # weight 0 is the base weight, bit for bit
    torch.testing.assert_close(module.delta(0.7, weight), merged - weight)
    other = _base_weight(module, seed=101)
    if module.additive:  # W + s * dW, dW the same for every W: a merge of -s undoes one of s
        alone = module.delta(0.7)
        assert alone.shape == module.weight_shape()
        torch.testing.assert_close(merged, weight + alone.reshape(weight.shape))
        torch.testing.assert_close(module.delta(0.7, other), alone.reshape(other.shape), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.apply(merged.clone(), -0.7), weight, rtol=1e-5, atol=1e-5)
    else:  # the change depends on the weight, so it cannot be had without one
        assert not torch.allclose(module.delta(0.7, other), module.delta(0.7, weight))
        with pytest.raises(UserError, match="depends on the weight"):
            module.delta(0.7)


@pytest.mark.parametrize("name", EXAMPLES)
def test_by_rows_means_rows_apply_on_their_own(name):
    module = EXAMPLES[name]
    weight = _base_weight(module)
    whole = module.apply(weight.clone(), 0.7)
    if module.by_rows:
        split = 3
        top = module.apply(weight[:split].clone(), 0.7, rows=(0, split))
        bottom = module.apply(weight[split:].clone(), 0.7, rows=(split, weight.shape[0]))
        torch.testing.assert_close(torch.cat([top, bottom]), whole)
    else:
        with pytest.raises(UserError, match="whole weight"):
            module.apply(weight[:3].clone(), 0.7, rows=(0, 3))


@pytest.mark.parametrize("name", EXAMPLES)
def test_bias_update_is_none_or_an_update_of_the_output_rows(name):
    module = EXAMPLES[name]
    bias = module.bias_update()
    if name == "full-with-bias":
        assert bias is not None
    if bias is None:
        return
    rows = _base_weight(module).shape[0]
    assert isinstance(bias, Adapter) and bias.weight_shape() == (rows,) and bias.bias_update() is None
    base = _randn(rows, seed=102)
    torch.testing.assert_close(bias.apply(base.clone(), 0.5), base + 0.5 * bias.delta(1.0))


@pytest.mark.parametrize("name", EXAMPLES)
def test_to_keeps_the_kind_and_casts_every_float_tensor(name):
    module = EXAMPLES[name]
    half = module.to(torch.float16)
    assert type(half) is type(module) and half.kind == module.kind and half.parameter_count() == module.parameter_count()
    assert all(t.dtype == torch.float16 for t in half.factors().values() if t.is_floating_point())
    assert half.weight_shape() == module.weight_shape() and half.rank == module.rank and half.scale == module.scale


def test_an_fp8_lora_is_checked_for_non_finite_values():
    """torch has no isfinite for float8: a file stored in fp8 is checked in fp32, and its NaN still found."""
    down = torch.randn(2, 5).to(torch.float8_e4m3fn)
    up = torch.randn(7, 2).to(torch.float8_e4m3fn)
    state = LoraState({"unet.a": LoraModule(down, up, 3.0)})
    assert state.non_finite_modules() == []
    broken = up.float()
    broken[0, 0] = float("nan")
    state = LoraState({"unet.a": LoraModule(down, up, 3.0), "unet.b": LoraModule(down, broken.to(torch.float8_e4m3fn), 3.0)})
    assert state.non_finite_modules() == ["unet.b"]
