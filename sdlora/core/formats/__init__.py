"""The one place that renames LoRA keys: detect a file's format and convert it to and from `LoraState`.

Renaming is driven by tables (`names`: format suffixes, kohya prefixes and segment vocabulary; `ldm`: the LDM
block layout of SD1/SD2 and SDXL); any key that maps to nothing raises a `ValueError` naming it, never is dropped.
"""

from .detect import detect_format
from .names import ATTN_PROCS, DIFFUSERS, DIFFUSERS_OLD, FORMATS, KOHYA, KOHYA_LDM, METADATA_KEY, PEFT, WRITABLE
from .readers import to_lora_state
from .writers import kohya_prefixes, lora_config_kwargs, to_diffusers, to_diffusers_layers, to_kohya

__all__ = [
    "ATTN_PROCS", "DIFFUSERS", "DIFFUSERS_OLD", "FORMATS", "KOHYA", "KOHYA_LDM", "METADATA_KEY", "PEFT", "WRITABLE",
    "detect_format", "kohya_prefixes", "lora_config_kwargs", "to_diffusers", "to_diffusers_layers", "to_kohya",
    "to_lora_state",
]  # fmt: skip
