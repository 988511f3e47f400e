"""LoRA files re-factored: any adapter kind as a plain LoRA (`convert --rank`), a LoRA at another rank (`resize`),
several LoRAs as one (`combine`). Every factoring goes through `core.lowrank` and reports what it dropped.

Kinds whose update depends on the weight it adapts (DoRA, OFT, BOFT, IA3, GLoRA) are factored from their update
on a given model's weights (`model_weights`): the plain LoRA then reproduces them on that model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..core.families import unflattened_shape
from ..core.kinds import KIND_NAMES
from ..core.lowrank import Factored, Report, as_plain_lora, factor, factor_module, factor_product, update_of
from ..core.state import FORMAT_METADATA_KEY, Adapter, LoraModule, LoraState, known_shape
from ..errors import UserError
from ..inference.adapters import matched_layers
from ..inference.prompts import check_lora_weight
from ..models.loading import load_pipeline

Tensor = torch.Tensor


def model_weights(
    state: LoraState, model: str, *, config: str | None = None, allow_pickle: bool = False, label: str = "the LoRA"
) -> dict[str, Tensor]:
    """{module path: the weight it adapts in `model`} (fp32), for factoring kinds whose update depends on it."""
    pipe = load_pipeline(model, dtype=torch.float32, config=config, allow_pickle=allow_pickle)
    return {path: layer.weight.detach() for path, (layer, _) in matched_layers(state, pipe, label).items()}


def _is_conv_kernel(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and any(size > 1 for size in shape[2:])


def _layer_shape(path: str, module: Adapter, weight: Tensor | None = None) -> tuple[int, ...] | None:
    """The shape of the weight `module` adapts: `weight`'s, else the module's own (a conv kernel stored flattened
    unflattened by the layer's name); None where neither says it (an OFT's or IA3's without the model)."""
    if weight is not None:
        return tuple(weight.shape)
    shape = known_shape(module.weight_shape())
    return None if shape is None else unflattened_shape(path, shape)


def _needs_model(label: str, path: str, module: Adapter, remedy: str) -> UserError:
    return UserError(f"{label}: module {path} is {KIND_NAMES[module.kind]}, whose update depends on the weight it adapts: {remedy}")


def _product_norm(module: LoraModule) -> float:
    """||scale * up @ down||_F without forming the product (the norm of the core between their QR factors)."""
    up, down = module.up.to(torch.float32).reshape(module.up.shape[0], -1), module.down.to(torch.float32).reshape(module.rank, -1)
    core = torch.linalg.qr(up).R @ torch.linalg.qr(down.T).R.T
    return float(torch.linalg.matrix_norm(core)) * abs(module.scale)


def _exact(module: LoraModule) -> Factored:
    return Factored(module, _product_norm(module), 1.0, 0.0)


def _fresh_metadata(state: LoraState) -> dict[str, str]:
    """The header a re-factored file keeps: none of the old training metadata (its dims and alphas would lie)."""
    return {k: v for k, v in state.metadata.items() if k != FORMAT_METADATA_KEY and not k.startswith(("ss_", "lora_adapter"))}


def to_plain_lora(
    state: LoraState,
    rank: int | None = None,
    conv_rank: int | None = None,
    weights: Mapping[str, Tensor] | None = None,
    label: str = "the LoRA",
) -> tuple[LoraState, Report]:
    """Every module as a plain LoRA: LoRA modules of rank <= `rank` exactly (a Tucker conv with its core folded in),
    the others by the SVD of their update at `rank` (3x3 convs at `conv_rank`, default `rank`). `weights` holds the
    base weights that kinds like DoRA need (see `model_weights`)."""
    weights = weights or {}
    modules: dict[str, Adapter] = {}
    report = Report({}, [])
    biases = [path for path, m in state.modules.items() if m.bias_update() is not None]
    for path, module in tqdm(
        state.modules.items(), desc="factoring", unit="module", leave=False, disable=None
    ):  # None: no bar off a terminal
        weight = weights.get(path)
        shape = _layer_shape(path, module, weight)
        target = conv_rank if conv_rank is not None and shape is not None and _is_conv_kernel(shape) else rank
        if isinstance(module, LoraModule) and shape is not None:  # a LoRA always says its shape
            plain = as_plain_lora(module)
            if target is None or plain.rank <= target:
                report.modules[path] = _exact(plain)
            else:
                report.modules[path] = factor_product(plain.up * plain.scale, plain.down, shape, target, scale=plain.scale)
        elif target is None:
            raise UserError(
                f"{label}: module {path} is {KIND_NAMES[module.kind]}, which only a LoRA of some rank can stand for: give --rank R (an SVD of its update)"
            )
        elif shape is None or (not module.additive and weight is None):  # no shape: an OFT's or IA3's, not additive either
            raise _needs_model(label, path, module, "give --model (the model the LoRA is for) to factor it")
        elif module.additive:
            report.modules[path] = factor_module(module, shape, target)
        else:
            report.modules[path] = factor(update_of(module, weight, shape), target)
        modules[path] = report.modules[path].module
    if biases:
        report.notes.append(f"bias differences (diff_b) of {len(biases)} modules left out: a LoRA carries none (first: {biases[0]})")
    return LoraState(modules, _fresh_metadata(state)), report


def resize_lora(
    state: LoraState, rank: int | None = None, dynamic: tuple[str, float] | None = None, label: str = "the LoRA"
) -> tuple[LoraState, Report]:
    """Each module at `rank` (one of a lower rank is kept as it is), or at the rank `dynamic` = (method, value)
    picks from its singular values, capped by `rank` when both are given (kohya's resize_lora.py). Each module
    keeps its alpha / rank, so the new alpha is new rank * old scale, as there."""
    if rank is None and dynamic is None:
        raise UserError("resize needs --rank R, --dynamic METHOD:VALUE, or both")
    modules: dict[str, Adapter] = {}
    report = Report({}, [])
    for path, module in tqdm(
        state.modules.items(), desc="resizing", unit="module", leave=False, disable=None
    ):  # None: no bar off a terminal
        if not isinstance(module, LoraModule):
            raise UserError(
                f"{label}: module {path} is {KIND_NAMES[module.kind]}: resize takes LoRA files; `sdlora convert --rank R` makes a LoRA of it"
            )
        plain = as_plain_lora(module)
        if dynamic is None and rank is not None and plain.rank <= rank:  # no dynamic: `rank` is given
            entry = _exact(plain)
        else:
            shape = (plain.up.shape[0], *plain.down.shape[1:])
            entry = factor_product(plain.up * plain.scale, plain.down, shape, rank, dynamic=dynamic, scale=plain.scale)
        report.modules[path] = entry
        modules[path] = entry.module
    return LoraState(modules, _fresh_metadata(state)), report


def combine_loras(loras: Sequence[tuple[str, LoraState, float]], rank: int | None = None) -> tuple[LoraState, Report | None]:
    """(label, state, weight) LoRAs as one. Without `rank`, exactly: each module's ups (times weight * scale) and
    downs side by side, rank the sum, scale 1 (LoRA modules only). With `rank`: the SVD of the weighted sum of the
    updates at that rank (any additive kind), with its report."""
    if not loras:
        raise UserError("combine needs at least one LoRA")
    by_path: dict[str, list[tuple[str, Adapter, float]]] = {}
    for label, state, weight in loras:
        check_lora_weight(weight, label)
        for path, module in state.modules.items():
            by_path.setdefault(path, []).append((label, module, weight))
    modules: dict[str, Adapter] = {}
    factored: dict[str, Factored] = {}  # the report's modules, with `rank`
    for path, parts in tqdm(by_path.items(), desc="combining", unit="module", leave=False, disable=None):  # None: no bar off a terminal
        shape = _common_shape(path, parts)
        plain_parts = [(label, module, weight) for label, module, weight in parts if isinstance(module, LoraModule)]
        plain = len(plain_parts) == len(parts)
        if rank is None and not plain:
            label, module, _ = next(p for p in parts if not isinstance(p[1], LoraModule))
            raise UserError(
                f"{label}: module {path} is {KIND_NAMES[module.kind]}: combining without --rank joins LoRA modules side by side; give --rank R to combine it by SVD"
            )
        if plain:
            ups, downs = _side_by_side(plain_parts, shape)
            if rank is None:
                modules[path] = LoraModule(downs, ups, alpha=float(downs.shape[0]))
                continue
            factored[path] = factor_product(ups, downs, shape, rank)
        else:
            for label, module, _ in parts:
                if not module.additive:
                    raise _needs_model(label, path, module, "convert it with `sdlora convert --rank R --model MODEL` first")
            total = sum(weight * update_of(module, None, shape) for _, module, weight in parts)
            factored[path] = factor(total, rank)
        modules[path] = factored[path].module
    return LoraState(modules, {}), Report(factored, []) if rank is not None else None


def _common_shape(path: str, parts: Sequence[tuple[str, Adapter, float]]) -> tuple[int, ...]:
    """The layer shape every LoRA's module at `path` updates (a 1x1 conv and a Linear count as one); else an error
    naming two that differ, or one whose shape only the model's weight says (OFT, IA3: not additive either)."""
    shapes = []
    for label, module, _ in parts:
        shape = _layer_shape(path, module)
        if shape is None:
            raise _needs_model(label, path, module, "convert it with `sdlora convert --rank R --model MODEL` first")
        shapes.append((label, shape))
    first_label, first = shapes[0]
    for label, shape in shapes[1:]:
        if _squeezed(shape) != _squeezed(first):
            raise UserError(
                f"module {path} is {list(first)} in {first_label} but {list(shape)} in {label}: the LoRAs are for different models"
            )
    return first


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _side_by_side(parts: Sequence[tuple[str, LoraModule, float]], shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The ups (each times its weight * alpha / rank) and downs of LoRA modules concatenated along the rank, in
    `shape`'s layout (a 1x1 conv's or a Linear's)."""
    ups, downs = [], []
    for _, module, weight in parts:
        plain = as_plain_lora(module)
        up = plain.up.to(torch.float32).reshape(plain.up.shape[0], plain.rank) * (weight * plain.scale)
        ups.append(up)
        downs.append(plain.down.to(torch.float32).reshape(plain.rank, -1))
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    if len(shape) == 4:
        return up.reshape(*up.shape, 1, 1).contiguous(), down.reshape(down.shape[0], *shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()
