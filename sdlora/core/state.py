"""The canonical in-memory LoRA: one (down, up, alpha) triple per adapted module.

Every reader in `core.formats` produces a `LoraState`; every writer, loader and merge consumes one. The weight
update has one implementation, `LoraModule.add_to`, which the streaming merge, the in-memory merge, `delta` and the
tests all use.
Module paths are diffusers paths with the component first, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (always with `text_model.`, see DESIGN.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMAT_METADATA_KEY = "sdlora_format"  # the format a file was read from, kept in LoraState.metadata


@dataclass
class LoraModule:
    """One adapted module: `down` is A ([r, in] or [r, in, kh, kw]), `up` is B ([out, r] or [out, r, 1, 1])."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None means alpha = rank (scale 1), as in formats that store no alpha

    def __post_init__(self) -> None:
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise ValueError(f"LoRA weights must be 2-D or 4-D, got down {tuple(self.down.shape)}, up {tuple(self.up.shape)}")
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LoRA rank mismatch: down {tuple(self.down.shape)} vs up {tuple(self.up.shape)}")
        if self.alpha is not None:
            self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def scale(self) -> float:
        """alpha / rank: the factor the update up @ down is multiplied by."""
        return self.effective_alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this LoRA adapts."""
        if self.is_conv:
            return (self.up.shape[0], self.down.shape[1], self.down.shape[2], self.down.shape[3])
        return (self.up.shape[0], self.down.shape[1])

    def add_to(self, weight: torch.Tensor, multiplier: float = 1.0, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """W += multiplier * (alpha / r) * up @ down, in place on a contiguous fp32 `weight`; returns it.

        `weight` may be [out, in] or [out, in, kh, kw] (a 1x1 conv and a Linear are the same map): the update is
        one fused pass over W (`addmm_`), with no full-size temporary. With `rows`, `weight` holds only those output
        rows of the base weight and gets their part of the update.
        """
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            raise ValueError(f"add_to needs a contiguous fp32 weight, got {weight.dtype}")
        up = self.up.to(device=weight.device, dtype=torch.float32).reshape(self.up.shape[0], self.rank)
        if rows is not None:
            up = up[rows[0] : rows[1]]
        down = self.down.to(device=weight.device, dtype=torch.float32).reshape(self.rank, -1)
        weight.view(weight.shape[0], -1).addmm_(up, down, alpha=multiplier * self.scale)
        return weight

    def delta(self, multiplier: float = 1.0) -> torch.Tensor:
        """multiplier * (alpha / r) * up @ down in fp32, shaped like the base weight."""
        return self.add_to(torch.zeros(self.weight_shape(), dtype=torch.float32), multiplier)


@dataclass
class LoraState:
    """All adapted modules of a LoRA, keyed by component-first diffusers path, plus file metadata."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.modules)

    def components(self) -> list[str]:
        """Components present, in pipeline order (unet, text_encoder, text_encoder_2)."""
        present = {path.split(".", 1)[0] for path in self.modules}
        return [c for c in COMPONENTS if c in present]

    def for_component(self, component: str) -> dict[str, LoraModule]:
        """The modules of one component, with the component prefix removed."""
        prefix = component + "."
        return {p[len(prefix) :]: m for p, m in self.modules.items() if p.startswith(prefix)}

    def restricted_to(self, component: str) -> LoraState:
        """The modules of one component, keeping their full paths (and the metadata)."""
        return LoraState({p: m for p, m in self.modules.items() if p.startswith(component + ".")}, dict(self.metadata))

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def alphas(self) -> list[float]:
        return sorted({m.effective_alpha for m in self.modules.values()})

    def non_finite_modules(self) -> list[str]:
        """Paths of the modules whose down or up holds NaN or inf (a broken file, e.g. from a diverged run)."""
        return [path for path, m in self.modules.items() if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())]

    def check_finite(self, label: str) -> None:
        """Raise a one-line ValueError naming `label` when any module holds NaN or inf."""
        bad = self.non_finite_modules()
        if bad:
            raise ValueError(
                f"{label} holds NaN or inf values in {len(bad)} modules (first: {bad[0]}): the file is broken, perhaps saved from a diverged run"
            )

    def most_common_rank_alpha(self, component: str | None = None) -> tuple[int, float]:
        """The (rank, alpha) most modules share: the base of a peft LoraConfig with rank/alpha patterns."""
        modules = self.modules.values() if component is None else self.for_component(component).values()
        ranks = Counter(m.rank for m in modules)
        alphas = Counter(m.effective_alpha for m in modules)
        return ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]

    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).down.dtype

    def to(self, dtype: torch.dtype) -> LoraState:
        """A copy with every tensor cast to `dtype`."""
        return LoraState(
            {p: LoraModule(m.down.to(dtype), m.up.to(dtype), m.alpha) for p, m in self.modules.items()},
            dict(self.metadata),
        )
