"""Describe a LoRA file for `sdlora inspect`: format, components, ranks, alphas, size and base architecture."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .families import guess_architecture
from .state import FORMAT_METADATA_KEY, LoraState


def describe(state: LoraState, path: str | os.PathLike | None = None) -> dict:
    """A JSON-ready summary of a LoRA."""
    per_component = Counter(p.split(".", 1)[0] for p in state.modules)
    kinds = Counter(
        "conv3x3" if m.is_conv and m.down.shape[-1] > 1 else "conv1x1" if m.is_conv else "linear" for m in state.modules.values()
    )
    rank, alpha = state.most_common_rank_alpha()
    info = {
        "file": str(path) if path else None,
        "format": state.metadata.get(FORMAT_METADATA_KEY, "unknown"),
        "architecture": guess_architecture(state),
        "components": dict(per_component),
        "modules": len(state),
        "layer_kinds": dict(kinds),
        "rank": rank,
        "ranks": state.ranks(),
        "alpha": alpha,
        "alphas": state.alphas(),
        "scale": alpha / rank,
        "dtype": str(state.dtype()).removeprefix("torch."),
        "parameters": sum(m.down.numel() + m.up.numel() for m in state.modules.values()),
        "size_bytes": Path(path).stat().st_size if path else None,
        "metadata": {k: v for k, v in state.metadata.items() if k != FORMAT_METADATA_KEY},
    }
    return info


def format_description(info: dict) -> str:
    """Human-readable lines for `sdlora inspect` (metadata values shortened)."""
    lines = [
        f"file:          {info['file']}",
        f"format:        {info['format']}",
        f"architecture:  {info['architecture']}",
        f"components:    {', '.join(f'{c} ({n} modules)' for c, n in info['components'].items())}",
        f"modules:       {info['modules']} ({', '.join(f'{n} {k}' for k, n in info['layer_kinds'].items())})",
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
