"""Describe a LoRA file for `sdlora inspect`: format, components, ranks, alphas, size and base architecture."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .families import family_of_lora, guess_architecture
from .kinds import KIND_NAMES, DoraModule, OftModule
from .state import FORMAT_METADATA_KEY, Adapter, LoraState


def describe(state: LoraState, path: str | os.PathLike | None = None) -> dict:
    """A JSON-ready summary of a LoRA."""
    per_component = Counter(p.split(".", 1)[0] for p in state.modules)
    kinds = Counter(_layer_kind(m.weight_shape()) for m in state.modules.values())
    rank, alpha = state.most_common_rank_alpha()
    adapter_kinds: dict[str, dict] = {}
    for module in state.modules.values():
        name = _kind_name(module)
        entry = adapter_kinds.setdefault(name, {"modules": 0, "ranks": set(), "alphas": set(), "blocks": set()})
        entry["modules"] += 1
        if module.rank is not None:
            entry["ranks"].add(module.rank)
            entry["alphas"].add(module.effective_alpha)
        elif isinstance(module, OftModule):  # OFT or BOFT, no rank: its size is its rotation blocks', its alpha a constraint
            entry["blocks"].add(int(module.blocks.shape[-1]))
            entry["alphas"].add(module.alpha)
    info = {
        "file": str(path) if path else None,
        "format": state.metadata.get(FORMAT_METADATA_KEY, "unknown"),
        "architecture": _architecture(state),
        "components": dict(per_component),
        "modules": len(state),
        "layer_kinds": dict(kinds),
        "adapter_kinds": {
            name: {"modules": e["modules"], "ranks": sorted(e["ranks"]), "alphas": sorted(e["alphas"])}
            | ({"block_sizes": sorted(e["blocks"])} if e["blocks"] else {})
            for name, e in sorted(adapter_kinds.items())
        },
        "rank": rank,
        "ranks": state.ranks(),
        "alpha": alpha,
        "alphas": state.alphas(),
        "scale": alpha / rank if rank else 1.0,
        "dtype": str(state.dtype()).removeprefix("torch."),
        "parameters": sum(m.parameter_count() for m in state.modules.values()),
        "size_bytes": Path(path).stat().st_size if path else None,
        "metadata": {k: v for k, v in state.metadata.items() if k != FORMAT_METADATA_KEY},
    }
    return info


def _kind_name(module: Adapter) -> str:
    """LoRA, LoHa, LoKr, full diff, or `DoRA (LoRA)` for a DoRA of a kind."""
    if isinstance(module, DoraModule):
        return f"DoRA ({KIND_NAMES[module.base_kind]})"
    return KIND_NAMES[module.kind]


def _kind_line(name: str, entry: dict) -> str:
    def listed(values) -> str:
        return "/".join(f"{v:g}" for v in values)

    sizes = f", dim {listed(entry['ranks'])}, alpha {listed(entry['alphas'])}" if entry["ranks"] else ""
    if entry.get("block_sizes"):
        sizes = f", blocks of {listed(entry['block_sizes'])}, {_constraints(entry['alphas'])}"
    return f"{name} ({entry['modules']} modules{sizes})"


def _constraints(values) -> str:
    """OFT/BOFT constraints as LyCORIS names them (||Q|| held to constraint * output rows); 0 is none."""
    if not any(values):
        return "no constraint"
    return "constraint " + "/".join("none" if value == 0 else f"{value:g}" for value in values)


def _layer_kind(shape: tuple[int | None, ...]) -> str:
    """linear, conv1x1, or the conv by its kernel: conv3x3 (the UNets'), conv2x2 (SD3's patch embedding)."""
    if len(shape) == 4:
        height, width = shape[-2:]
        return f"conv{height}x{width}" if height is not None and width is not None and (height, width) != (1, 1) else "conv1x1"
    return "linear"


def format_description(info: dict) -> str:
    """Human-readable lines for `sdlora inspect` (metadata values shortened)."""
    lines = [
        f"file:          {info['file']}",
        f"format:        {info['format']}",
        f"architecture:  {info['architecture']}",
        f"components:    {', '.join(f'{c} ({n} modules)' for c, n in info['components'].items())}",
        f"modules:       {info['modules']} ({', '.join(f'{n} {k}' for k, n in info['layer_kinds'].items())})",
        f"kinds:         {', '.join(_kind_line(name, entry) for name, entry in info['adapter_kinds'].items())}",
        f"rank:          {info['rank']}" + (f" (all: {', '.join(map(str, info['ranks']))})" if len(info["ranks"]) > 1 else ""),
        f"alpha:         {info['alpha']:g}" + (f" (all: {', '.join(f'{a:g}' for a in info['alphas'])})" if len(info["alphas"]) > 1 else ""),
        f"scale:         {info['scale']:g} (alpha / rank)",
        f"dtype:         {info['dtype']}",
        f"parameters:    {info['parameters']:,}",
    ]
    if info["size_bytes"] is not None:
        lines.append(f"size:          {info['size_bytes'] / 2**20:.2f} MiB")
    if info["metadata"]:
        lines.append("metadata:")
        for key, value in sorted(info["metadata"].items()):
            text = value if len(value) <= 100 else value[:97] + "..."
            lines.append(f"  {key}: {text}".replace("\n", " "))
    return "\n".join(lines)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2, sort_keys=True)


def _architecture(state: LoraState) -> str:
    """What the tensor shapes say (`guess_architecture`); where they fit no released model (a test or demo model's
    widths), the family kohya's metadata names, with the shapes' reason: "SD1.x by its metadata (cross-attention width 64)"."""
    architecture = guess_architecture(state)
    family = family_of_lora(state) if architecture.startswith("unknown") else None
    if family is None:
        return architecture
    return f"{family.label} by its metadata ({architecture.removeprefix('unknown (').removesuffix(')')}: no released model's)"
