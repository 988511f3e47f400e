"""Adapter kinds beyond plain LoRA (`core.state.LoraModule`): LoHa, LoKr, full diffs, DoRA, OFT/BOFT, IA3 and
GLoRA, each with its factors and its weight update as a function of the base weight.

Every kind is a `core.state.Adapter`: it answers `kind`, `additive` (W' = W + s * dW, so merging -s undoes it),
`by_rows` (its update can be applied to a range of output rows on its own), `rank` / `alpha` / `effective_alpha` /
`scale`, `weight_shape()`, `fits(shape)`, `factors()`, `apply(weight, multiplier, rows)`, `bias_update()` and
`to(dtype)`, and inherits `delta()` and `parameter_count()`.

The scale rules, as ComfyUI (`comfy/weight_adapter/`), AUTOMATIC1111 (`extensions-builtin/Lora/network_*.py`) and
LyCORIS's forward pass apply them: alpha / dim applied once; no alpha means scale 1; LoKr's scale is 1 when neither
half is factored (LyCORIS `lokr.py` sets alpha = dim then). LyCORIS 4.1.3's own `merge_to` applies alpha / dim twice
for LoHa and LoKr (`get_weight` scales, `get_diff_weight` scales again): that is its bug, not the format.

DoRA at a weight below 1 (`DoraModule.apply`): sdlora blends the base weight with the full DoRA weight, W' = W + s *
(DoRA(W + dW) - W), as ComfyUI's `weight_decompose` and A1111 do, so weight 0 is the base model and 1 the trained
one. LyCORIS instead blends W + dW with its decomposition (weight 0 still adds dW), and peft scales dW inside the
decomposition (weight 0 still rescales W to the learnt magnitude). All three agree at weight 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UserError
from .state import Adapter, AlphaScaled, LoraModule, fits_size, known_shape

Tensor = torch.Tensor


def _scale(alpha: float | None, dim: int | None) -> float:
    """alpha / dim, or 1 when there is no alpha (or no factored half to take a dim from)."""
    return 1.0 if alpha is None or dim is None else float(alpha) / dim


def _cast(tensor: Tensor, like: Tensor) -> Tensor:
    return tensor.to(device=like.device, dtype=torch.float32)


def _add_rows(weight: Tensor, delta: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """weight += delta (or the delta's `rows`), whatever their shapes, given equal rows and element counts."""
    delta = delta.reshape(delta.shape[0], -1)
    if rows is not None:
        delta = delta[rows[0] : rows[1]]
    weight.view(weight.shape[0], -1).add_(delta)
    return weight


def _tucker(core: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """LyCORIS/ComfyUI's Tucker rebuild, einsum('i j k l, j r, i p -> p r k l'): up [r, out], down [r, in]."""
    return torch.einsum("ijkl,jr,ip->prkl", core, down, up)


class Unscaled(Adapter):
    """The kinds without rank or alpha (full diffs, IA3): their update is what they store, at scale 1."""

    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None
    effective_alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0


@dataclass
class LohaModule(AlphaScaled):
    """LoHa (LyCORIS): dW = (w1a @ w1b) * (w2a @ w2b) * alpha / dim, the Hadamard product of two low-rank products.

    Without Tucker, w1a / w2a are [out, dim] and w1b / w2b [dim, in * kh * kw]; with Tucker (`hada_t1` / `hada_t2`,
    [dim, dim, kh, kw]) w1a / w2a are [dim, out] and w1b / w2b [dim, in].
    """

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None

    kind: ClassVar[str] = "loha"
    additive: ClassVar[bool] = True
    by_rows: ClassVar[bool] = True  # a row of dW needs only that row of w1a / w2a (a column, with Tucker)

    def __post_init__(self) -> None:
        t1, t2 = self.t1, self.t2
        if t1 is None or t2 is None:
            if t1 is not None or t2 is not None:
                raise UserError("LoHa has one Tucker core (hada_t1/hada_t2) without the other")
            ok = (
                self.w1a.shape[1] == self.w1b.shape[0] == self.w2a.shape[1] == self.w2b.shape[0]
                and self.w1a.shape[0] == self.w2a.shape[0]
                and self.w1b.shape[1:] == self.w2b.shape[1:]
            )
        else:
            ok = (
                t1.shape == t2.shape
                and self.w1a.shape == self.w2a.shape
                and self.w1b.shape == self.w2b.shape
                and t1.shape[:2] == (self.w1a.shape[0], self.w1b.shape[0])
            )
        if not ok:
            shapes = {name: tuple(t.shape) for name, t in self.factors().items()}
            raise UserError(f"LoHa factors do not fit together: {shapes}")
        if self.alpha is not None:
            self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    def weight_shape(self) -> tuple[int, ...]:
        if self.t1 is None:
            return (self.w1a.shape[0], *self.w1b.shape[1:])
        return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])

    def fits(self, shape: tuple[int, ...]) -> bool:
        return fits_size(self.weight_shape(), shape)

    def factors(self) -> dict[str, Tensor]:
        tucker = {"t1": self.t1, "t2": self.t2} if self.t1 is not None and self.t2 is not None else {}
        return {"w1a": self.w1a, "w1b": self.w1b, "w2a": self.w2a, "w2b": self.w2b} | tucker

    def to(self, dtype: torch.dtype) -> LohaModule:
        cast = {name: t.to(dtype) for name, t in self.factors().items()}
        return LohaModule(alpha=self.alpha, **cast)

    def _update(self, multiplier: float, like: Tensor, rows: tuple[int, int] | None) -> Tensor:
        """dW (or its output `rows`) in fp32 on `like`'s device: [out, in * k] without Tucker, [out, in, kh, kw] with it."""
        w1a, w1b, w2a, w2b = (_cast(t, like) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is None or self.t2 is None:
            if rows is not None:
                w1a, w2a = w1a[rows[0] : rows[1]], w2a[rows[0] : rows[1]]
            first, second = w1a @ w1b.flatten(1), w2a @ w2b.flatten(1)
        else:
            if rows is not None:
                w1a, w2a = w1a[:, rows[0] : rows[1]], w2a[:, rows[0] : rows[1]]
            first, second = _tucker(_cast(self.t1, like), w1b, w1a), _tucker(_cast(self.t2, like), w2b, w2a)
        return first.mul_(second).mul_(multiplier * self.scale)

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        weight.view(weight.shape[0], -1).add_(self._update(multiplier, weight, rows).reshape(weight.shape[0], -1))
        return weight

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


@dataclass
class LokrModule(Adapter):
    """LoKr (LyCORIS): dW = kron(w1, w2) * scale, each half stored whole (`lokr_w1`, `lokr_w2`) or factored
    (`lokr_w1_a @ lokr_w1_b`, `lokr_w2_a @ lokr_w2_b`, the second optionally with a Tucker core `lokr_t2`).
    The scale is alpha / dim of a factored half (the second's when both are), 1 when neither is factored."""

    w1: Tensor | None = None
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None
    alpha: float | None = None

    kind: ClassVar[str] = "lokr"
    additive: ClassVar[bool] = True
    by_rows: ClassVar[bool] = True  # a row of kron(w1, w2) is one row of each half

    def __post_init__(self) -> None:
        for number, whole, a, b in ((1, self.w1, self.w1a, self.w1b), (2, self.w2, self.w2a, self.w2b)):
            tucker = number == 2 and self.t2 is not None  # then a is [dim, out], b [dim, in], as in LoHa's Tucker form
            if whole is None and a is not None and b is not None:
                if a.shape[0] != b.shape[0] if tucker else a.shape[1] != b.shape[0]:
                    raise UserError(
                        f"LoKr factors lokr_w{number}_a {tuple(a.shape)} and lokr_w{number}_b {tuple(b.shape)} do not fit together"
                    )
            elif (whole is None) == (a is None or b is None):
                raise UserError(f"LoKr needs lokr_w{number}, or both lokr_w{number}_a and lokr_w{number}_b")
        if self.t2 is not None and (
            self.w2a is None or self.w2b is None or tuple(self.t2.shape[:2]) != (self.w2a.shape[0], self.w2b.shape[0])
        ):
            raise UserError(f"LoKr's Tucker core lokr_t2 {tuple(self.t2.shape)} does not fit lokr_w2_a / lokr_w2_b")
        if self.alpha is not None:
            self.alpha = float(self.alpha)

    @property
    def rank(self) -> int | None:
        """The dim of the factored half (the second's when both are), None when both halves are whole."""
        return int(self.w2b.shape[0]) if self.w2b is not None else int(self.w1b.shape[0]) if self.w1b is not None else None

    @property
    def effective_alpha(self) -> float | None:
        return None if self.rank is None else (float(self.rank) if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def _factored(self, number: int) -> tuple[Tensor, Tensor]:
        """(lokr_wN_a, lokr_wN_b) of a half stored factored (`__post_init__` made sure both are there)."""
        a, b = (self.w1a, self.w1b) if number == 1 else (self.w2a, self.w2b)
        if a is None or b is None:
            raise RuntimeError(f"LoKr half {number} is not factored")
        return a, b

    def halves(self, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The two halves of the Kronecker product in fp32 (the second holding a conv's kernel)."""
        like = like if like is not None else torch.empty(0)
        if self.w1 is not None:
            w1 = _cast(self.w1, like)
        else:
            w1a, w1b = self._factored(1)
            w1 = _cast(w1a, like) @ _cast(w1b, like)
        if self.w2 is not None:
            return w1, _cast(self.w2, like)
        w2a, w2b = self._factored(2)
        if self.t2 is not None:
            return w1, _tucker(_cast(self.t2, like), _cast(w2b, like), _cast(w2a, like))
        return w1, _cast(w2a, like) @ _cast(w2b, like).flatten(1)

    def weight_shape(self) -> tuple[int, ...]:
        if self.w1 is not None:
            w1 = tuple(self.w1.shape)
        else:
            w1a, w1b = self._factored(1)
            w1 = (w1a.shape[0], w1b.shape[1])
        if self.w2 is not None:
            w2 = tuple(self.w2.shape)
        else:
            w2a, w2b = self._factored(2)
            w2 = (w2a.shape[1], w2b.shape[1], *self.t2.shape[2:]) if self.t2 is not None else (w2a.shape[0], *w2b.shape[1:])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def fits(self, shape: tuple[int, ...]) -> bool:
        return fits_size(self.weight_shape(), shape)

    def factors(self) -> dict[str, Tensor]:
        names = ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to(self, dtype: torch.dtype) -> LokrModule:
        return LokrModule(alpha=self.alpha, **{name: t.to(dtype) for name, t in self.factors().items()})

    def _update(self, multiplier: float, like: Tensor) -> Tensor:
        """dW in fp32 on `like`'s device, shaped as `weight_shape()`."""
        w1, w2 = self.halves(like)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim)))  # a conv's kernel stays in the second half
        return torch.kron(w1.contiguous(), w2.contiguous()).mul_(multiplier * self.scale)  # kron needs contiguous halves

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        if rows is None:
            return _add_rows(weight, self._update(multiplier, weight), None)
        # row o of kron(w1, w2) is outer(w1[o // out2], w2[o % out2]) flattened: only the rows asked for are built
        w1, w2 = self.halves(weight)
        w1, w2 = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
        index = torch.arange(rows[0], rows[1], device=w1.device)
        block = (w1[index // w2.shape[0]].unsqueeze(2) * w2[index % w2.shape[0]].unsqueeze(1)).reshape(len(index), -1)
        weight.view(weight.shape[0], -1).add_(block, alpha=multiplier * self.scale)
        return weight

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


@dataclass
class FullModule(Unscaled):
    """A full-weight difference (LyCORIS `full`): dW = diff, and the bias's difference `diff_b` when stored."""

    diff: Tensor
    diff_b: Tensor | None = None

    kind: ClassVar[str] = "full"
    additive: ClassVar[bool] = True
    by_rows: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.diff_b is not None and tuple(self.diff_b.shape) != (self.diff.shape[0],):
            raise UserError(
                f"full diff: diff_b {tuple(self.diff_b.shape)} does not fit diff {tuple(self.diff.shape)} (expected [{self.diff.shape[0]}])"
            )

    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return fits_size(self.weight_shape(), shape)

    def factors(self) -> dict[str, Tensor]:
        return {"diff": self.diff} | ({"diff_b": self.diff_b} if self.diff_b is not None else {})

    def to(self, dtype: torch.dtype) -> FullModule:
        return FullModule(self.diff.to(dtype), None if self.diff_b is None else self.diff_b.to(dtype))

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        return _add_rows(weight, _cast(self.diff, weight) * multiplier, rows)

    def bias_update(self) -> FullModule | None:
        """The bias's own difference, as a module of its own kind (merged into `<module>.bias`)."""
        return None if self.diff_b is None else FullModule(self.diff_b)


@dataclass
class DoraModule(Adapter):
    """DoRA: a low-rank kind (`inner`) whose merged weight is renormalised to a learnt magnitude per output row or per
    input column: DoRA(W) = magnitude * (W + dW) / ||W + dW||. See the module docstring for weights below 1.

    The magnitude is kept as LyCORIS's `dora_scale` (what the kohya writer writes): [out, 1, ...] per output row,
    [1, in, ...] per input column (LyCORIS's wd_on_out=False). peft's `lora_magnitude_vector` is always per output
    row, the norm taken over every other axis (`DoraConv2dLayer.get_weight_norm`), and stored as [out] for a Linear,
    [1, out, 1, 1] for a conv: its readers say `on_output=True`, since a square conv's [1, c, 1, 1] reads either way."""

    inner: Adapter  # a LoRA, LoHa, LoKr or GLoRA (`_DORA_OVER`)
    magnitude: Tensor
    on_output: bool | None = None  # the norm's axis; None: told by the magnitude's shape, as LyCORIS stores it

    kind: ClassVar[str] = "dora"
    additive: ClassVar[bool] = False  # the update depends on W: merging -s does not undo it
    by_rows: ClassVar[bool] = False

    def __post_init__(self) -> None:
        shape, count = known_shape(self.weight_shape()), self.magnitude.numel()
        if shape is None:  # the kinds a DoRA sits on know their whole shape; OFT and IA3 take the layer's
            raise UserError(f"a DoRA magnitude beside {KIND_NAMES[self.inner.kind]} weights is not something LyCORIS makes")
        told = self.on_output is not None
        if not told:  # LyCORIS's [1, in, ...] is per input column, any other shape per output row
            self.on_output = not (self.magnitude.ndim >= 2 and self.magnitude.shape[0] == 1 and shape[0] != 1)
        if self.on_output and count == shape[0]:  # peft's [out] and [1, out, 1, 1] as LyCORIS's [out, 1, ...]
            self.magnitude = self.magnitude.reshape(shape[0], *[1] * (max(self.magnitude.ndim, len(shape)) - 1))
            return
        columns = math.prod(shape[1:])
        if self.on_output or columns % count or count > columns:
            fit = (
                f"does not fit the {shape[0]} output rows"
                if told and self.on_output
                else "fits neither the output rows nor the input columns"
            )
            raise UserError(f"DoRA magnitude {tuple(self.magnitude.shape)} {fit} of a {list(shape)} weight")

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def effective_alpha(self) -> float | None:
        return self.inner.effective_alpha

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def base_kind(self) -> str:
        return self.inner.kind

    def weight_shape(self) -> tuple[int | None, ...]:
        return self.inner.weight_shape()

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.inner.fits(shape)

    def factors(self) -> dict[str, Tensor]:
        return self.inner.factors() | {"magnitude": self.magnitude}

    def to(self, dtype: torch.dtype) -> DoraModule:
        return DoraModule(self.inner.to(dtype), self.magnitude.to(dtype), self.on_output)

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        if rows is not None:
            raise UserError("DoRA's update needs the whole weight (its norm spans every row)")
        merged = self.inner.apply(weight.clone(), 1.0)  # W + dW at the LoRA's own scale
        magnitude = _cast(self.magnitude, weight).flatten()
        eps = torch.finfo(torch.float32).eps  # as LyCORIS and ComfyUI (peft adds none): a zero row or column stays finite
        if self.on_output:
            rows_view = merged.view(merged.shape[0], -1)
            decomposed = rows_view * (magnitude / (rows_view.norm(dim=1) + eps)).unsqueeze(1)
        else:
            columns = merged.view(merged.shape[0], magnitude.numel(), -1)
            decomposed = columns * (magnitude / (columns.norm(dim=(0, 2)) + eps)).view(1, -1, 1)
        flat = weight.view(weight.shape[0], -1)
        flat.add_(decomposed.reshape(flat.shape) - flat, alpha=multiplier)
        return weight

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


def _fits_known(ours: tuple[int | None, ...], shape: tuple[int, ...]) -> bool:
    """Whether a weight of `shape` fits an update whose shape is known only in part (None: any size there)."""
    known = [(i, size) for i, size in enumerate(ours[:2]) if size is not None]
    return all(i < len(shape) and shape[i] == size for i, size in known)


def _cayley(blocks: Tensor, constraint: float) -> Tensor:
    """The orthogonal blocks R = (I + Q)(I - Q)^-1 of Q = B - B^T, Q scaled to norm `constraint` where it is larger
    (LyCORIS `functional/diag_oft.get_r`; kohya's `networks/oft.py` clamps the same norm)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass
class OftModule(Adapter):
    """Diagonal OFT (LyCORIS `diag-oft`, kohya's OFT): the weight's output rows, in blocks of `b`, are rotated by
    orthogonal blocks, OFT(W)_k = R_k^T W_k (LyCORIS's einsum 'k n m, k n ... -> k m ...'), then scaled per row by
    `rescale` when stored. `oft_blocks` is [blocks, b, b]; `alpha` is not a scale but the constraint on ||Q||,
    applied as alpha * out (LyCORIS, kohya; 0 means none). A weight w gives W + w * (OFT(W) - W), which is exactly
    LyCORIS's and kohya's interpolation of R towards I without `rescale`; with one, LyCORIS keeps the whole rescale
    at any weight (rescale * (w R^T + (1 - w) I) W: `modules/diag_oft.py` make_weight). ComfyUI takes alpha itself
    as the constraint (not alpha * out), applies its strength twice and ignores `rescale` for OFT: the same at weight
    1 for files without rescale and constraint, which is what LyCORIS writes by default."""

    blocks: Tensor
    rescale: Tensor | None = None
    alpha: float | None = None

    kind: ClassVar[str] = "oft"
    additive: ClassVar[bool] = False  # W' depends on W: merging -s does not undo it
    by_rows: ClassVar[bool] = False
    rank: ClassVar[None] = None

    def __post_init__(self) -> None:
        self._check_blocks()
        if self.rescale is not None and self.rescale.shape[0] != self.out_features:
            raise UserError(f"{KIND_NAMES[self.kind]} rescale {tuple(self.rescale.shape)} does not fit {self.out_features} output rows")
        self.alpha = 0.0 if self.alpha is None else float(self.alpha)

    def _check_blocks(self) -> None:
        if self.blocks.ndim != 3 or self.blocks.shape[1] != self.blocks.shape[2]:
            raise UserError(f"OFT oft_blocks {tuple(self.blocks.shape)} is not [blocks, size, size]")

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    @property
    def effective_alpha(self) -> float:
        """The constraint (0: none); `__post_init__` turned a missing alpha into 0."""
        return 0.0 if self.alpha is None else self.alpha

    scale: ClassVar[float] = 1.0

    def weight_shape(self) -> tuple[int | None, ...]:
        return (self.out_features, None)  # the input width is the layer's, whatever it is

    def fits(self, shape: tuple[int, ...]) -> bool:
        return _fits_known(self.weight_shape(), shape)

    def factors(self) -> dict[str, Tensor]:
        return {"blocks": self.blocks} | ({"rescale": self.rescale} if self.rescale is not None else {})

    def to(self, dtype: torch.dtype) -> OftModule:
        return type(self)(self.blocks.to(dtype), None if self.rescale is None else self.rescale.to(dtype), self.alpha)

    def _rotated(self, flat: Tensor) -> Tensor:
        r = _cayley(_cast(self.blocks, flat), self.effective_alpha * self.out_features)
        count, size, _ = r.shape
        return torch.einsum("knm,kni->kmi", r, flat.view(count, size, -1)).reshape(flat.shape)

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        if rows is not None:
            raise UserError(f"{KIND_NAMES[self.kind]}'s update needs the whole weight (its blocks span rows)")
        flat = weight.view(weight.shape[0], -1)
        if flat.shape[0] != self.out_features:
            raise UserError(
                f"{KIND_NAMES[self.kind]} blocks {tuple(self.blocks.shape)} cover {self.out_features} rows, the weight has {flat.shape[0]}"
            )
        adapted = self._rotated(flat)
        if self.rescale is not None:
            adapted.mul_(_cast(self.rescale, flat).reshape(-1, 1))
        flat.add_(adapted - flat, alpha=multiplier)
        return weight

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


@dataclass
class BoftModule(OftModule):
    """Butterfly OFT (LyCORIS `boft`): `oft_blocks` [m, blocks, b, b] are m stages of orthogonal blocks, stage i
    mixing rows 2^i * b/2 apart (LyCORIS `functional/boft.py`), then `rescale`. Below weight 1 sdlora blends the
    weights, W + w * (BOFT(W) - W), as for every kind whose update depends on W; LyCORIS and ComfyUI instead move
    each stage's R towards I. At weight 1 all agree."""

    kind: ClassVar[str] = "boft"

    def _check_blocks(self) -> None:
        if self.blocks.ndim != 4 or self.blocks.shape[2] != self.blocks.shape[3] or self.blocks.shape[2] % 2:
            raise UserError(f"BOFT oft_blocks {tuple(self.blocks.shape)} is not [stages, blocks, size, size] of an even size")
        stages, count, size = self.blocks.shape[:3]
        if 2 ** (stages - 1) * size > count * size:
            raise UserError(f"BOFT oft_blocks {tuple(self.blocks.shape)}: {stages} stages need more than {count} blocks of {size}")

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[1] * self.blocks.shape[2])

    def _rotated(self, flat: Tensor) -> Tensor:
        r = _cayley(_cast(self.blocks, flat), self.effective_alpha * self.out_features)
        size = r.shape[-1]
        x = flat
        for stage in range(r.shape[0]):
            stride = 2**stage * size // 2  # rows (c, g=2, k) regrouped as (c, k, g), then taken in blocks of `size`
            x = x.unflatten(0, (-1, 2, stride)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
            x = torch.einsum("bij,bj...->bi...", r[stage], x)
            x = x.flatten(0, 1).unflatten(0, (-1, stride, 2)).transpose(1, 2).flatten(0, 2)
        return x.contiguous()


@dataclass
class Ia3Module(Unscaled):
    """IA3 (LyCORIS `ia3`): dW = W * w, the weight scaled per output row, or per input column when `on_input`
    (`weight` [out] or [in]; a conv's [1, channels, 1, 1]). LyCORIS's forward pass gives W * (1 + w * multiplier),
    as sdlora does; a module has no alpha."""

    weight: Tensor
    on_input: Tensor

    kind: ClassVar[str] = "ia3"
    additive: ClassVar[bool] = False  # dW depends on W: merging -s does not undo it
    by_rows: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.weight.ndim not in (1, 4) or (self.weight.ndim == 4 and (self.weight.shape[0] != 1 or self.weight.shape[2:].numel() != 1)):
            raise UserError(f"IA3 weight {tuple(self.weight.shape)} is neither [channels] nor [1, channels, 1, 1]")
        if self.on_input.numel() != 1:
            raise UserError(f"IA3 on_input {tuple(self.on_input.shape)} is not one number")

    @property
    def inputs(self) -> bool:
        return bool(self.on_input.item())

    def weight_shape(self) -> tuple[int | None, ...]:
        channels = int(self.weight.numel())
        return (None, channels) if self.inputs else (channels, None)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return _fits_known(self.weight_shape(), shape)

    def factors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "on_input": self.on_input}

    def to(self, dtype: torch.dtype) -> Ia3Module:
        return Ia3Module(self.weight.to(dtype), self.on_input)

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        flat = weight.view(weight.shape[0], -1)
        scales = _cast(self.weight, weight).flatten()
        if self.inputs:  # columns of a conv are (channel, kernel position): each channel's scale over its kernel
            factor = scales.repeat_interleave(flat.shape[1] // scales.numel()).unsqueeze(0)
        else:
            factor = (scales if rows is None else scales[rows[0] : rows[1]]).unsqueeze(1)
        flat.add_(flat * factor, alpha=multiplier)
        return weight

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


@dataclass
class GloraModule(AlphaScaled):
    """GLoRA (LyCORIS `glora`): dW = alpha / dim * (W @ A + B), A = a_in @ a_out ([in, dim] @ [dim, in], acting on the
    input side of W) and B = b1 @ b2 a LoRA of the layer (with a Tucker core `bm` for a conv kernel).

    LyCORIS 4 names them a1 [in, dim], a2 [dim, in], b1 [out, dim], b2 [dim, in]; LyCORIS before 2.0 swapped the
    numbers (a1 [dim, in], a2 [in, dim], b1 [dim, in], b2 [out, dim]); which one a file is, is read from the shapes,
    as ComfyUI does. alpha 0 or none means scale 1 (LyCORIS)."""

    a1: Tensor
    a2: Tensor
    b1: Tensor
    b2: Tensor
    bm: Tensor | None = None
    alpha: float | None = None

    kind: ClassVar[str] = "glora"
    additive: ClassVar[bool] = False  # dW depends on W: merging -s does not undo it
    by_rows: ClassVar[bool] = True

    def __post_init__(self) -> None:
        a1, a2, b1, b2 = (t.reshape(t.shape[0], -1) for t in (self.a1, self.a2, self.b1, self.b2))
        # (a_in, a_out, up, down) as LyCORIS 4 names them and as LyCORIS before 2.0 did; a naming fits when the
        # products chain and one dim is shared by all four. For a square layer both can chain: the real one has the
        # rank below the width (ComfyUI asks the layer's weight instead; a file alone must do here).
        readings = [(a1, a2, b1, b2, self.b1, self.b2)] + ([(a2, a1, b2, b1, self.b2, self.b1)] if self.bm is None else [])
        fitting = [
            r for r in readings
            if r[0].shape[1] == r[1].shape[0] == r[2].shape[1] == r[3].shape[0] and r[0].shape[0] == r[1].shape[1]
            and r[3].shape[1] % r[0].shape[0] == 0
        ]  # fmt: skip
        if not fitting:
            shapes = {name: tuple(t.shape) for name, t in self.factors().items()}
            raise UserError(f"GLoRA factors do not fit together: {shapes}")
        self._a_in, self._a_out, _, _, up, down = min(fitting, key=lambda r: r[0].shape[1])
        if self.bm is not None and (self.bm.ndim != 4 or tuple(self.bm.shape[:2]) != (up.shape[1], down.shape[0])):
            raise UserError(
                f"GLoRA Tucker core bm {tuple(self.bm.shape)} does not fit b1 {tuple(self.b1.shape)} / b2 {tuple(self.b2.shape)}"
            )
        self._b = LoraModule(down, up, None, self.bm)
        self.alpha = None if self.alpha is None or float(self.alpha) == 0 else float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self._a_in.shape[1])

    def weight_shape(self) -> tuple[int, ...]:
        return self._b.weight_shape()

    def fits(self, shape: tuple[int, ...]) -> bool:
        ours = self.weight_shape()
        return ours[0] == shape[0] and math.prod(ours) == math.prod(shape) and len(shape) > 1 and shape[1] == self._a_in.shape[0]

    def factors(self) -> dict[str, Tensor]:
        return {"a1": self.a1, "a2": self.a2, "b1": self.b1, "b2": self.b2} | ({"bm": self.bm} if self.bm is not None else {})

    def to(self, dtype: torch.dtype) -> GloraModule:
        return GloraModule(alpha=self.alpha, **{name: t.to(dtype) for name, t in self.factors().items()})

    def apply(self, weight: Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> Tensor:
        flat = weight.view(weight.shape[0], -1)
        a_in, a_out = _cast(self._a_in, weight), _cast(self._a_out, weight)
        channels = a_in.shape[0]
        per_channel = flat.view(flat.shape[0], channels, -1)  # (out rows, in channels, kernel positions)
        update = torch.einsum("oik,ir,rj->ojk", per_channel, a_in, a_out).reshape(flat.shape)
        b = self._b.apply(torch.zeros(self._b.weight_shape(), dtype=torch.float32, device=weight.device)).reshape(-1, flat.shape[1])
        update.add_(b if rows is None else b[rows[0] : rows[1]])
        flat.add_(update, alpha=multiplier * self.scale)
        return weight

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


# the kinds' names as messages and `sdlora inspect` give them
KIND_NAMES = {
    "lora": "LoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "full": "full-weight diff",
    "dora": "DoRA",
    "oft": "OFT",
    "boft": "BOFT",
    "ia3": "IA3",
    "glora": "GLoRA",
}
KIND_CLASSES: dict[str, Callable[..., Adapter]] = {
    "lora": LoraModule,
    "loha": LohaModule,
    "lokr": LokrModule,
    "full": FullModule,
    "oft": OftModule,
    "boft": BoftModule,
    "ia3": Ia3Module,
    "glora": GloraModule,
}
_NO_ALPHA = ("full", "ia3")  # kinds whose files carry no alpha
_DORA_OVER = ("lora", "loha", "lokr", "glora")  # the kinds a DoRA magnitude can sit on (LyCORIS weight_decompose)


def build_adapter(kind: str, fields: dict[str, Tensor], alpha: float | None = None, magnitude: Tensor | None = None) -> Adapter:
    """The adapter of `kind` from its factors by field name; a DoRA of it when a magnitude is given. `oft` with
    4-dimensional blocks is BOFT (LyCORIS tells the two apart the same way)."""
    if kind == "oft" and fields["blocks"].ndim == 4:
        kind = "boft"
    if magnitude is not None and kind not in _DORA_OVER:
        raise UserError(f"a DoRA magnitude (dora_scale) beside {KIND_NAMES[kind]} weights is not something LyCORIS makes")
    adapter = KIND_CLASSES[kind](**fields) if kind in _NO_ALPHA else KIND_CLASSES[kind](**fields, alpha=alpha)
    return adapter if magnitude is None else DoraModule(adapter, magnitude)
