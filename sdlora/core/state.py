"""The canonical in-memory LoRA: one adapter module per adapted layer, all of them `Adapter`s.

Every reader in `core.formats` produces a `LoraState`; every writer, loader and merge consumes one. The weight
update of each kind has one implementation, its `Adapter.apply`, which the streaming merge, the in-memory merge,
`delta` and the tests all use.
Module paths are diffusers paths with the component first, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (always with `text_model.`, see DESIGN.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import UserError

# every family's components in pipeline order (the denoiser, then the text encoders; core.families' table has them)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
FORMAT_METADATA_KEY = "sdlora_format"  # the format a file was read from, kept in LoraState.metadata


# An abstract base class rather than a typing.Protocol: every kind then says by its class line that it is an
# adapter, a kind missing a member cannot be built (TypeError naming it), and `isinstance` needs no runtime_checkable.
class Adapter(ABC):
    """What every adapter kind (LoRA here, the others in `core.kinds`) answers; merging, loading, inspecting,
    writing and re-factoring use nothing else unless they handle one kind's own tensors.

    The class-level answers (`kind`, `additive`, `by_rows`) are abstract properties that a kind fills with a
    ClassVar; `rank` and `alpha` may be fields, ClassVars or properties.
    """

    @property
    @abstractmethod
    def kind(self) -> str:
        """The kind's name, a key of `core.kinds.KIND_NAMES` (lora, loha, lokr, full, dora, oft, boft, ia3, glora)."""

    @property
    @abstractmethod
    def additive(self) -> bool:
        """Whether W' = W + s * dW with dW independent of W, so that merging -s undoes a merge of s."""

    @property
    @abstractmethod
    def by_rows(self) -> bool:
        """Whether `apply` can update a range of output rows on its own (`rows`)."""

    @property
    @abstractmethod
    def rank(self) -> int | None:
        """The rank (LyCORIS: dim) the scale divides by; None for kinds without one (full diffs, IA3, OFT)."""

    @property
    @abstractmethod
    def alpha(self) -> float | None:
        """The alpha as stored (None: none stored); OFT's is the constraint on its rotation, not a scale."""

    @property
    @abstractmethod
    def effective_alpha(self) -> float | None:
        """The alpha in force (alpha = rank when none is stored); None for kinds without rank and alpha."""

    @property
    @abstractmethod
    def scale(self) -> float:
        """The factor the update is multiplied by: alpha / rank, or 1."""

    @abstractmethod
    def weight_shape(self) -> tuple[int | None, ...]:
        """The shape of the base weight the module adapts; None where it takes the layer's size (OFT's, IA3's)."""

    @abstractmethod
    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether `apply` can update a base weight of `shape`."""

    @abstractmethod
    def factors(self) -> dict[str, torch.Tensor]:
        """The module's tensors by field name."""

    @abstractmethod
    def to(self, dtype: torch.dtype) -> Adapter:
        """A copy with every floating tensor cast to `dtype`."""

    @abstractmethod
    def apply(self, weight: torch.Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The new weight at `multiplier`, written in place into `weight` (contiguous fp32) and returned. With `rows`
        (kinds with `by_rows`), `weight` holds only those output rows of the base weight and gets their part."""

    @abstractmethod
    def bias_update(self) -> Adapter | None:
        """The module's update of the layer's bias, as an adapter merged into `<layer>.bias`; None for none."""

    def delta(self, multiplier: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The change `apply` makes to `weight` at `multiplier`, in fp32 and shaped like it. Additive kinds need no
        weight (the change is then shaped as `weight_shape()`); the others' change depends on it."""
        if weight is not None:
            base = weight.detach().to(torch.float32)
            return self.apply(base.clone().contiguous(), multiplier).sub_(base)
        if not self.additive:
            raise UserError(f"a {self.kind} module's update depends on the weight it adapts: a base model is needed")
        shape = known_shape(self.weight_shape())
        if shape is None:
            raise UserError(f"a {self.kind} module's update does not say its full shape: a base model is needed")
        return self.apply(torch.zeros(shape, dtype=torch.float32), multiplier)

    def parameter_count(self) -> int:
        """How many numbers the module stores (every tensor of `factors()`, which each kind states)."""
        return sum(tensor.numel() for tensor in self.factors().values())


def known_shape(shape: tuple[int | None, ...]) -> tuple[int, ...] | None:
    """`shape` when every size in it is known, else None."""
    sizes = [size for size in shape if size is not None]
    return tuple(sizes) if len(sizes) == len(shape) else None


def fits_size(ours: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether an update of shape `ours` fits a weight of `shape`: the same output rows and element count (a LoHa of
    a conv without Tucker stores its kernel flattened; `apply` updates the weight in whatever shape it has)."""
    return ours[0] == shape[0] and math.prod(ours) == math.prod(shape)


class AlphaScaled(Adapter):
    """The scale of every kind with a rank (dim) and an alpha: alpha / rank, applied once; no alpha means alpha =
    rank, scale 1 (kohya, LyCORIS, ComfyUI, A1111)."""

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def scale(self) -> float:
        """alpha / rank: the factor the update is multiplied by."""
        return self.effective_alpha / self.rank


@dataclass
class LoraModule(AlphaScaled):
    """One LoRA (LoCon) module: `down` is A ([r, in] or [r, in, kh, kw]), `up` is B ([out, r] or [out, r, 1, 1]);
    with Tucker's `mid` ([r, r, kh, kw], LyCORIS's `lora_mid`), `down` is [r, in, 1, 1] and the kernel lives in `mid`."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None means alpha = rank (scale 1), as in formats that store no alpha
    mid: torch.Tensor | None = None  # Tucker's core for a conv kernel (LyCORIS `use_tucker`)

    kind: ClassVar[str] = "lora"
    additive: ClassVar[bool] = True  # W' = W + s * dW: merging the negated scale undoes it
    by_rows: ClassVar[bool] = True  # `apply` can update a range of output rows on its own

    def __post_init__(self) -> None:
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise UserError(f"LoRA weights must be 2-D or 4-D, got down {tuple(self.down.shape)}, up {tuple(self.up.shape)}")
        if self.up.shape[1] != self.down.shape[0]:
            raise UserError(f"LoRA rank mismatch: down {tuple(self.down.shape)} vs up {tuple(self.up.shape)}")
        if self.mid is not None and (self.mid.ndim != 4 or self.mid.shape[:2] != (self.rank, self.rank) or self.down.ndim != 4):
            raise UserError(
                f"LoRA Tucker core lora_mid {tuple(self.mid.shape)} does not fit down {tuple(self.down.shape)} (expected [{self.rank}, {self.rank}, kh, kw])"
            )
        if self.alpha is not None:
            self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this LoRA adapts."""
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (self.up.shape[0], self.down.shape[1], *kernel)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return fits_size(self.weight_shape(), shape)

    def factors(self) -> dict[str, torch.Tensor]:
        """The module's tensors by field name."""
        return {"down": self.down, "up": self.up} | ({"mid": self.mid} if self.mid is not None else {})

    def to(self, dtype: torch.dtype) -> LoraModule:
        return LoraModule(self.down.to(dtype), self.up.to(dtype), self.alpha, None if self.mid is None else self.mid.to(dtype))

    def add_to(self, weight: torch.Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """W += multiplier * (alpha / r) * up @ down, in place on a contiguous fp32 `weight`; returns it.

        `weight` may be [out, in] or [out, in, kh, kw] (a 1x1 conv and a Linear are the same map): the update is
        one fused pass over W (`addmm_`), with no full-size temporary. With `rows`, `weight` holds only those output
        rows of the base weight and gets their part of the update.
        """
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            raise UserError(f"add_to needs a contiguous fp32 weight, got {weight.dtype}")
        up = self.up.to(device=weight.device, dtype=torch.float32).reshape(self.up.shape[0], self.rank)
        if rows is not None:
            up = up[rows[0] : rows[1]]
        down = self.down.to(device=weight.device, dtype=torch.float32).reshape(self.rank, -1)
        if self.mid is not None:
            # Tucker: dW[o, i, k, l] = sum_ab up[o, a] mid[a, b, k, l] down[b, i] (LyCORIS rebuild_tucker, ComfyUI)
            mid = self.mid.to(device=weight.device, dtype=torch.float32)
            down = torch.einsum("abkl,bi->aikl", mid, down).reshape(self.rank, -1)
        weight.view(weight.shape[0], -1).addmm_(up, down, alpha=multiplier * self.scale)
        return weight

    apply = add_to  # the interface every adapter kind shares

    def bias_update(self) -> Adapter | None:
        return None  # the layer's bias stays as it is


@dataclass
class LoraState:
    """All adapted modules of a LoRA, keyed by component-first diffusers path, plus file metadata."""

    modules: dict[str, Adapter] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.modules)

    def components(self) -> list[str]:
        """Components present, in pipeline order (unet or transformer, text_encoder, text_encoder_2, text_encoder_3)."""
        present = {path.split(".", 1)[0] for path in self.modules}
        return [c for c in COMPONENTS if c in present]

    def for_component(self, component: str) -> dict[str, Adapter]:
        """The modules of one component, with the component prefix removed."""
        prefix = component + "."
        return {p[len(prefix) :]: m for p, m in self.modules.items() if p.startswith(prefix)}

    def restricted_to(self, component: str) -> LoraState:
        """The modules of one component, keeping their full paths (and the metadata)."""
        return LoraState({p: m for p, m in self.modules.items() if p.startswith(component + ".")}, dict(self.metadata))

    def kinds(self) -> list[str]:
        """The adapter kinds present (lora, loha, lokr, full, dora, ...), sorted."""
        return sorted({m.kind for m in self.modules.values()})

    def ranks(self) -> list[int]:
        """The ranks (LyCORIS: dims) of the modules that have one; a full diff or IA3 has none."""
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    def alphas(self) -> list[float]:
        """The alphas of the modules with a rank (an OFT's alpha is a constraint, not a scale)."""
        return sorted({m.effective_alpha for m in self.modules.values() if m.rank is not None and m.effective_alpha is not None})

    def non_finite_modules(self) -> list[str]:
        """Paths of the modules with a factor that holds NaN or inf (a broken file, e.g. from a diverged run)."""
        # torch has no isfinite for float8 (1-byte) tensors: they are checked in fp32, which holds every fp8 value
        return [
            path
            for path, m in self.modules.items()
            if not all(bool(torch.isfinite(t.float() if t.dtype.itemsize == 1 else t).all()) for t in m.factors().values())
        ]

    def check_finite(self, label: str) -> None:
        """Raise a one-line ValueError naming `label` when any module holds NaN or inf."""
        bad = self.non_finite_modules()
        if bad:
            raise UserError(
                f"{label} holds NaN or inf values in {len(bad)} modules (first: {bad[0]}): the file is broken, perhaps saved from a diverged run"
            )

    def most_common_rank_alpha(self, component: str | None = None) -> tuple[int, float]:
        """The (rank, alpha) most modules share: the base of a peft LoraConfig with rank/alpha patterns (and of
        kohya's ss_network_dim / ss_network_alpha); (0, 0.0) for a file of modules without rank (full diffs, IA3)."""
        modules = self.modules.values() if component is None else self.for_component(component).values()
        ranks = Counter(m.rank for m in modules if m.rank is not None)
        alphas = Counter(m.effective_alpha for m in modules if m.rank is not None and m.effective_alpha is not None)
        return (ranks.most_common(1)[0][0] if ranks else 0), (alphas.most_common(1)[0][0] if alphas else 0.0)

    def dtype(self) -> torch.dtype:
        return next(iter(next(iter(self.modules.values())).factors().values())).dtype

    def to(self, dtype: torch.dtype) -> LoraState:
        """A copy with every tensor cast to `dtype`."""
        return LoraState({p: m.to(dtype) for p, m in self.modules.items()}, dict(self.metadata))
