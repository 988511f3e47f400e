"""sdlora: train, convert, load and merge LoRA adapters for Stable Diffusion."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public API -> module; imported on first use so `import sdlora` stays light
_API = {
    "LoraModule": "state",
    "LoraState": "state",
    "read_lora": "lorafile",
    "write_lora": "lorafile",
    "write_diffusers": "lorafile",
    "write_kohya": "lorafile",
    "detect_format": "formats",
    "load_pipeline": "models",
    "write_tiny_model": "models",
    "build_tiny_pipeline": "tiny",
    "describe": "inspection",
    "load_lora": "pipeline",
    "set_lora_scales": "pipeline",
    "unload_loras": "pipeline",
    "generate": "images",
    "save_images": "images",
    "merge_lora": "merge",
    "merge_model": "merge",
    "TrainConfig": "config",
    "train": "trainer",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
