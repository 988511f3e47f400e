"""sdlora: train, convert, load and merge LoRA adapters for Stable Diffusion."""

from __future__ import annotations

import importlib

from .core.version import __version__

# public API -> module; imported on first use so `import sdlora` stays light
_API = {
    "LoraModule": "core.state",
    "LoraState": "core.state",
    "read_lora": "core.files",
    "write_lora": "core.files",
    "write_diffusers": "core.files",
    "write_kohya": "core.files",
    "detect_format": "core.formats",
    "describe": "core.inspection",
    "load_pipeline": "models.loading",
    "write_tiny_model": "models.loading",
    "build_tiny_pipeline": "models.tiny",
    "load_lora": "inference.adapters",
    "set_lora_scales": "inference.adapters",
    "unload_loras": "inference.adapters",
    "generate": "inference.generation",
    "save_images": "inference.generation",
    "merge_lora": "inference.merge",
    "merge_model": "inference.merge",
    "to_plain_lora": "tools.rerank",
    "resize_lora": "tools.rerank",
    "combine_loras": "tools.rerank",
    "extract_lora": "tools.extract",
    "TrainConfig": "training.config",
    "train": "training.recipe",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
