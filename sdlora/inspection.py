"""Describe a LoRA file for `sdlora inspect`: format, components, ranks, alphas, size and base architecture."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .state import LoraState

# width of the text fed to cross-attention (attn2.to_k input) and of CLIP's hidden state, per architecture
_CROSS_ATTENTION_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_TEXT_HIDDEN_WIDTH = {768: "SD1.x", 1024: "SD2.x"}


def guess_architecture(state: LoraState) -> str:
    """'SD1.x', 'SD2.x', 'SDXL' from tensor shapes, or 'unknown (...)' with the width seen."""
    if "text_encoder_2" in state.components():
        return "SDXL"
    for path, module in state.modules.items():
        if path.startswith("unet.") and path.endswith(("attn2.to_k", "attn2.to_v")):
            width = int(module.down.shape[1])
            return _CROSS_ATTENTION_WIDTH.get(width, f"unknown (cross-attention width {width})")
    for path, module in state.modules.items():
        if path.startswith("text_encoder.") and path.endswith(("q_proj", "k_proj", "v_proj")):
            width = int(module.down.shape[1])
            return _TEXT_HIDDEN_WIDTH.get(width, f"unknown (text-encoder width {width})")
    if any(".transformer_blocks.1." in path for path in state.modules):
        return "SDXL"  # only SDXL stacks several transformer blocks per attention
    return "unknown (no cross-attention or text-encoder module to measure)"


def describe(state: LoraState, path: str | os.PathLike | None = None) -> dict:
    """A JSON-ready summary of a LoRA."""
    from .lorafile import FORMAT_METADATA_KEY

    per_component = Counter(p.split(".", 1)[0] for p in state.modules)
    kinds = Counter("conv3x3" if m.is_conv and m.down.shape[-1] > 1 else "conv1x1" if m.is_conv else "linear" for m in state.modules.values())
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
