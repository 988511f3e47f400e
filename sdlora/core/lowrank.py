"""Low-rank factoring of weight updates: the one SVD that `convert --rank`, `extract`, `resize` and `combine` use,
the rank rules of kohya's resize_lora.py, and the error of what was dropped.

A module's update dW (`update_of`) is factored as a plain LoRA whose up @ down is dW's best rank-r approximation
(Eckart-Young: the r largest singular values). The error reported is exactly the dropped part's Frobenius norm,
relative to dW's: sqrt(sum of the dropped S^2 / sum of all S^2), the figure a measurement of merged weights gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .kinds import LohaModule, LokrModule
from .state import Adapter, LoraModule

Tensor = torch.Tensor
# kohya resize_lora.py's --dynamic_method names, with the value each takes
DYNAMIC_METHODS = {
    "sv_ratio": "keep singular values above the largest / VALUE (VALUE > 1)",
    "sv_fro": "keep the fewest singular values whose Frobenius norm is VALUE of the whole (0 < VALUE <= 1)",
    "sv_cumulative": "keep the fewest singular values whose sum is VALUE of the whole (0 < VALUE <= 1)",
}


@dataclass
class Factored:
    """A module's update as a plain LoRA, with what the factoring kept: `energy` is the Frobenius share kept
    (sqrt(sum kept S^2 / sum S^2), kohya's "retained fro"), `error` the dropped share, ||dW - up @ down|| / ||dW||."""

    module: LoraModule
    norm: float  # ||dW||_F, to weigh modules when errors are summed per component
    energy: float
    error: float


def update_of(module: Adapter, weight: Tensor | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """The module's weight update at weight 1 in fp32, shaped as the layer's weight (`shape`, or the base weight's).

    Additive kinds (LoRA, LoHa, LoKr, full diffs) need no base weight; the others' updates depend on it (DoRA's
    norm, OFT's rotation...), so `weight` is required for them."""
    if weight is not None or shape is None:
        return module.delta(1.0, weight)
    if not module.additive:
        raise UserError(f"a {module.kind} module's update depends on the weight it adapts: a base model is needed")
    return module.apply(torch.zeros(tuple(shape), dtype=torch.float32), 1.0)


def dynamic_rank(singular: Tensor, method: str, value: float) -> int:
    """The rank kohya's resize_lora.py keeps for `method` (`sv_ratio`, `sv_fro`, `sv_cumulative`) at `value`; at
    least 1, at most all singular values."""
    check_dynamic(method, value)
    count = int(singular.numel())
    if method == "sv_ratio":
        kept = int((singular > singular[0] / value).sum())
    else:
        values = singular.pow(2) if method == "sv_fro" else singular
        target = value**2 if method == "sv_fro" else value
        shares = torch.cumsum(values, 0) / values.sum().clamp_min(torch.finfo(torch.float32).tiny)
        kept = int(torch.searchsorted(shares, torch.tensor(target, dtype=shares.dtype) - 1e-7)) + 1
    return max(1, min(kept, count))


def check_dynamic(method: str, value: float) -> None:
    """A one-line ValueError unless `value` is in the range `method` takes: sv_ratio a finite ratio above 1,
    sv_fro and sv_cumulative a share in (0, 1]. Checked before any file is read."""
    if method not in DYNAMIC_METHODS:
        raise UserError(f"unknown dynamic method {method!r}: use {', '.join(DYNAMIC_METHODS)}")
    if method == "sv_ratio" and not 1 < value < math.inf:  # NaN fails this too
        raise UserError(f"sv_ratio takes a ratio above 1, and finite (the largest singular value over the smallest kept), got {value:g}")
    if method != "sv_ratio" and not 0 < value <= 1:
        raise UserError(f"{method} takes a share between 0 and 1, got {value:g}")


def factor(
    delta: Tensor,
    rank: int | None = None,
    *,
    dynamic: tuple[str, float] | None = None,
    scale: float = 1.0,
    clamp_quantile: float | None = None,
) -> Factored:
    """dW ([out, in] or a conv's [out, in, kh, kw]) as a plain LoRA of rank `rank` (capped by dW's own), or of the
    rank `dynamic` = (method, value) picks (capped by `rank` when both are given).

    up = U S and down = Vh, as kohya's tools store them; the LoRA's alpha is rank * `scale` so that its alpha/rank is
    `scale` (up is divided by it: resize keeps a file's alpha/rank). `clamp_quantile` clamps U S and Vh to the
    quantile of their absolute values, as kohya's extract_lora_from_models.py does against outliers in half
    precision (the error is then measured, not derived)."""
    matrix = _finite(delta.detach().to(torch.float32).reshape(delta.shape[0], -1))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _truncate(u, s, vh, tuple(delta.shape), rank, dynamic, scale, clamp_quantile, lambda: matrix)


def factor_product(
    up: Tensor,
    down: Tensor,
    shape: tuple[int, ...],
    rank: int | None = None,
    *,
    dynamic: tuple[str, float] | None = None,
    scale: float = 1.0,
) -> Factored:
    """`factor` of dW = up @ down ([out, r] @ [r, in * k]) without forming dW: the SVD of a product of rank r is
    that of the r x r core between the QR factors of up and down^T (what resize and combine need, fast at any
    layer width)."""
    up, down = up.detach().to(torch.float32).reshape(up.shape[0], -1), down.detach().to(torch.float32).reshape(down.shape[0], -1)
    _finite(up), _finite(down)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return _truncate(q_up @ u, s, vh @ q_down.T, tuple(shape), rank, dynamic, scale, None, lambda: up @ down)


def _finite(matrix: Tensor) -> Tensor:
    """`matrix`, or a one-line ValueError where it holds NaN or inf (the SVD would fail with LinAlgError)."""
    if not bool(torch.isfinite(matrix).all()):
        raise UserError("the update to factor holds NaN or inf values: a weight too large, or a diverged LoRA file")
    return matrix


def factor_kron(first: Tensor, second: Tensor, shape: tuple[int, ...], rank: int | None = None, *, scale: float = 1.0) -> Factored:
    """`factor` of dW = scale * kron(first, second) (LoKr; a conv's kernel in `second`) from the SVDs of the two
    small halves: the singular values of a Kronecker product are the products of the halves', its singular vectors
    the Kronecker products of theirs. Exact, and far cheaper than the SVD of dW."""
    a, b = first.detach().to(torch.float32).reshape(first.shape[0], -1), second.detach().to(torch.float32).reshape(second.shape[0], -1)
    u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
    u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
    s = torch.outer(s_a, s_b).flatten() * abs(scale)
    order = torch.argsort(s, descending=True)
    i, j = order // s_b.numel(), order % s_b.numel()
    u = (u_a[:, i].unsqueeze(1) * u_b[:, j].unsqueeze(0)).reshape(a.shape[0] * b.shape[0], -1)  # column k: kron(u_a[:, i], u_b[:, j])
    vh = (vh_a[i].unsqueeze(2) * vh_b[j].unsqueeze(1)).reshape(-1, a.shape[1] * b.shape[1])
    if scale < 0:
        u = -u
    return _truncate(u, s[order], vh, tuple(shape), rank, None, 1.0, None, lambda: scale * torch.kron(a, b))


def factor_module(module: Adapter, shape: tuple[int, ...], rank: int) -> Factored:
    """`factor` of an additive module's update at `rank`, by its kind's structure where it has one: a LoHa's
    (w1a @ w1b) * (w2a @ w2b) is the product of rank dim^2 factors (row-wise and column-wise Kronecker products of
    the halves), a LoKr's is a Kronecker product; the others through the SVD of their dense update."""
    if isinstance(module, LohaModule) and module.t1 is None:
        out, dims = module.w1a.shape[0], module.rank * module.w2b.shape[0]
        up = (module.w1a.float().unsqueeze(2) * module.w2a.float().unsqueeze(1)).reshape(out, dims) * module.scale
        down = (module.w1b.float().flatten(1).unsqueeze(1) * module.w2b.float().flatten(1).unsqueeze(0)).reshape(dims, -1)
        return factor_product(up, down, shape, rank)
    if isinstance(module, LokrModule):
        first, second = module.halves()
        return factor_kron(first, second, shape, rank, scale=module.scale)
    return factor(update_of(module, None, shape), rank)


def _truncate(u, s, vh, shape, rank, dynamic, scale, clamp_quantile, dense) -> Factored:
    """The rank-r LoRA of an SVD (see `factor`); `dense()` gives dW when the error must be measured."""
    out = shape[0]
    total = float(s.pow(2).sum())
    if total == 0.0:
        keep = 1
    elif dynamic is not None:
        keep = dynamic_rank(s, *dynamic)
        keep = min(keep, rank) if rank is not None else keep
    else:
        keep = min(int(rank), int(s.numel()))
    # no more than dW's numerical rank: columns for singular values at float rounding would be zeros in the file
    keep = max(1, min(keep, int((s > s[0] * 1e-6).sum()))) if total else keep
    up, down = u[:, :keep] * s[:keep], vh[:keep]
    kept = float(s[:keep].pow(2).sum())
    if clamp_quantile is not None and clamp_quantile < 1:
        bound = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
        error = float(torch.linalg.matrix_norm(dense() - up @ down)) / math.sqrt(total) if total else 0.0
    else:
        error = math.sqrt(max(0.0, total - kept) / total) if total else 0.0
    if len(shape) == 4:
        up, down = up.reshape(out, keep, 1, 1), down.reshape(keep, *shape[1:])
    module = LoraModule(down.contiguous(), (up / scale).contiguous(), alpha=keep * scale)
    return Factored(module, math.sqrt(total), math.sqrt(kept / total) if total else 1.0, error)


def as_plain_lora(module: LoraModule) -> LoraModule:
    """A Tucker-factored LoRA conv as the plain LoCon it equals (the core folded into `down`); a plain one as is."""
    if module.mid is None:
        return module
    mid, down = module.mid.to(torch.float32), module.down.to(torch.float32).reshape(module.rank, -1)
    folded = torch.einsum("abkl,bi->aikl", mid, down).to(module.down.dtype)
    return LoraModule(folded.contiguous(), module.up, module.alpha)


@dataclass
class Report:
    """What a factoring kept, module by module ({path: Factored}), summed up per component the way a measurement
    of the merged weights sums it: sqrt(sum ||dropped||^2 / sum ||dW||^2)."""

    modules: dict[str, Factored]
    notes: list[str]

    def component_errors(self) -> dict[str, float]:
        dropped: dict[str, float] = {}
        whole: dict[str, float] = {}
        for path, entry in self.modules.items():
            component = path.partition(".")[0]
            dropped[component] = dropped.get(component, 0.0) + (entry.error * entry.norm) ** 2
            whole[component] = whole.get(component, 0.0) + entry.norm**2
        return {c: math.sqrt(dropped[c] / whole[c]) if whole[c] else 0.0 for c in whole}

    def worst(self) -> tuple[str, Factored] | None:
        return max(self.modules.items(), key=lambda item: item[1].error, default=None)

    def lines(self) -> list[str]:
        """One line per component, the worst module, the energy kept, and the notes."""
        errors = self.component_errors()
        lines = []
        for component, error in errors.items():
            entries = [e for p, e in self.modules.items() if p.partition(".")[0] == component]
            ranks = sorted({e.module.rank for e in entries})
            shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            lines.append(f"{component}: {len(entries)} modules at rank {shown}, relative error {error:.4g}")
        worst = self.worst()
        if worst is not None:
            lines.append(f"worst module: {worst[0]} (relative error {worst[1].error:.4g})")
            energies = [e.energy for e in self.modules.values()]
            lines.append(f"energy kept (Frobenius): mean {sum(energies) / len(energies):.4f}, min {min(energies):.4f}")
        return lines + self.notes
