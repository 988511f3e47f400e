"""Name a LoRA file's format from its keys."""

from __future__ import annotations

from collections.abc import Iterable

from ...errors import UserError
from .ldm import has_ldm_names
from .names import ATTN_PROC_ENDINGS, ATTN_PROCS, DIFFUSERS, DIFFUSERS_OLD, KOHYA, KOHYA_LDM, KOHYA_PREFIXES, PEFT, SUFFIXES


def detect_format(keys: Iterable[str]) -> str:
    """Name the format of a LoRA state dict from its keys; raise ValueError if it is none we read."""
    keys = list(keys)
    if not keys:
        raise UserError("the file holds no tensors")
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in keys):
        return KOHYA_LDM if has_ldm_names(keys) else KOHYA
    if any(key.startswith("base_model.model.") for key in keys):
        return PEFT
    old_module_keys = [key.rsplit(".", 2)[0] for key in keys if key.endswith((".down.weight", ".up.weight"))]
    if any(key.endswith(ATTN_PROC_ENDINGS) for key in old_module_keys):
        return ATTN_PROCS
    if any(key.endswith((".lora", ".lora_linear_layer")) for key in old_module_keys):
        return DIFFUSERS_OLD
    if any(key.endswith(SUFFIXES[DIFFUSERS][0]) for key in keys):
        return DIFFUSERS
    raise UserError(f"unknown LoRA format: no key matches a known layout (first key: {keys[0]!r})")
