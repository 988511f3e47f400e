"""The one place that renames LoRA keys: detect a file's format and convert it to and from `LoraState`.

Renaming is driven by tables (segment vocabulary, LDM block layout, per-format suffixes); any key that maps to
nothing raises a `ValueError` naming it, never is dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping

import torch

from .ldm_names import (  # noqa: F401  (re-exported: the LDM tables are part of the renaming)
    LDM_KOHYA,
    LDM_RESNET_LAYERS,
    LDM_SD1,
    LDM_SDXL,
    SINGLE_FILE_TEXT_ENCODER_PREFIXES,
    SINGLE_FILE_UNET_PREFIX,
    has_ldm_names,
    ldm_to_diffusers,
    ldm_unet_key,
    ldm_unet_table_for_config,
    ldm_unet_table_from_keys,
    single_file_key,
)
from .state import LoraModule, LoraState

DIFFUSERS = "diffusers"  # unet.<path>.lora_A.weight + lora_adapter_metadata (what save_lora_weights writes)
KOHYA = "kohya"  # lora_unet_<path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha
KOHYA_LDM = "kohya-ldm"  # lora_unet_input_blocks_1_1_... (original LDM/SGM block names)
DIFFUSERS_OLD = "diffusers-old"  # unet.<path>.lora.down.weight, text encoder ...lora_linear_layer.down.weight
ATTN_PROCS = "diffusers-attn-procs"  # unet.<path>.processor.to_q_lora.down.weight
PEFT = "peft"  # base_model.model.<path>.lora_A.weight + adapter_config.json
FORMATS = (DIFFUSERS, KOHYA, KOHYA_LDM, DIFFUSERS_OLD, ATTN_PROCS, PEFT)
WRITABLE = (DIFFUSERS, KOHYA)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the peft LoraConfig of each component

# kohya prefix <-> component (SD1 text encoder is `lora_te_`; SDXL has two)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_WRITE_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_SDXL_WRITE_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

# Names of module-path segments that contain underscores, so `lora_unet_a_b_c` can be split back unambiguously
# by longest match. Plain words (attentions, resnets, ff, net, proj, ...) and numbers need no entry.
SEGMENTS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out",
    "to_q", "to_k", "to_v", "to_out", "add_k_proj", "add_v_proj", "conv_shortcut", "time_emb_proj",
    "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "encoder_hid_proj", "class_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "token_embedding", "position_embedding", "final_layer_norm", "text_projection", "layer_norm1", "layer_norm2",
}  # fmt: skip
_MAX_SEGMENT_PARTS = max(len(s.split("_")) for s in SEGMENTS)

# Per-format key suffixes: (down, up) weight names after the module path
_SUFFIXES = {
    DIFFUSERS: (".lora_A.weight", ".lora_B.weight"),
    PEFT: (".lora_A.weight", ".lora_B.weight"),
    KOHYA: (".lora_down.weight", ".lora_up.weight"),
    KOHYA_LDM: (".lora_down.weight", ".lora_up.weight"),
}
# Old diffusers (non-peft and attention processors) keys are <module key>.down.weight / .up.weight; the module
# key's last name says what it adapts: `.lora` the module itself, `<proj>_lora` a projection of the attention
# (`attn1.processor.to_q_lora` -> attn1.to_q; in CLIP `self_attn.to_q_lora` -> self_attn.q_proj).
_OLD_UNET_ENDINGS = {".lora": "", ".to_q_lora": ".to_q", ".to_k_lora": ".to_k", ".to_v_lora": ".to_v", ".to_out_lora": ".to_out.0"}
_OLD_TEXT_ENCODER_ENDINGS = {".lora": "", ".lora_linear_layer": "", ".to_q_lora": ".q_proj", ".to_k_lora": ".k_proj", ".to_v_lora": ".v_proj", ".to_out_lora": ".out_proj"}
_ATTN_PROC_ENDINGS = (".to_q_lora", ".to_k_lora", ".to_v_lora", ".to_out_lora")

_UNSUPPORTED_MARKERS = {
    "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "diff_b": "full-weight diff",
}


# ---------------------------------------------------------------- detection


def detect_format(keys: Iterable[str]) -> str:
    """Name the format of a LoRA state dict from its keys; raise ValueError if it is none we read."""
    keys = list(keys)
    if not keys:
        raise ValueError("the file holds no tensors")
    for marker, name in _UNSUPPORTED_MARKERS.items():
        if any(marker in key for key in keys):
            raise ValueError(f"{name} weights (key {next(k for k in keys if marker in k)!r}) are not supported: sdlora reads plain LoRA only")
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in keys):
        return KOHYA_LDM if has_ldm_names(keys) else KOHYA
    if any(key.startswith("base_model.model.") for key in keys):
        return PEFT
    old_module_keys = [key.rsplit(".", 2)[0] for key in keys if key.endswith((".down.weight", ".up.weight"))]
    if any(key.endswith(_ATTN_PROC_ENDINGS) for key in old_module_keys):
        return ATTN_PROCS
    if any(key.endswith((".lora", ".lora_linear_layer")) for key in old_module_keys):
        return DIFFUSERS_OLD
    if any(key.endswith(".lora_A.weight") for key in keys):
        return DIFFUSERS
    raise ValueError(f"unknown LoRA format: no key matches a known layout (first key: {keys[0]!r})")


# ---------------------------------------------------------------- reading


def to_lora_state(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    fmt: str | None = None,
    adapter_config: Mapping | None = None,
) -> LoraState:
    """Read a state dict in any supported format into a `LoraState` (metadata is kept as is)."""
    metadata = dict(metadata or {})
    fmt = fmt or detect_format(tensors)
    readers = {
        DIFFUSERS: _read_diffusers,
        PEFT: _read_peft,
        KOHYA: _read_kohya,
        KOHYA_LDM: _read_kohya,
        DIFFUSERS_OLD: _read_diffusers_old,
        ATTN_PROCS: _read_diffusers_old,  # one reader: diffusers wrote files mixing both layouts
    }
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    modules = readers[fmt](dict(tensors), metadata, adapter_config)
    if not modules:
        raise ValueError("the file holds no LoRA modules")
    return LoraState(dict(sorted(modules.items())), metadata)


def _pair_up(tensors: dict[str, torch.Tensor], suffixes: tuple[str, str], extra: tuple[str, ...] = ()) -> dict[str, dict[str, torch.Tensor]]:
    """Group keys by module: {module_key: {"down": t, "up": t, "alpha": t}}; raise on any other key."""
    down_suffix, up_suffix = suffixes
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for role, suffix in (("down", down_suffix), ("up", up_suffix), *((("alpha", s) for s in extra))):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            raise ValueError(f"LoRA key {key!r} maps to no module (expected a name ending in {down_suffix}, {up_suffix}{''.join(', ' + s for s in extra)})")
    for module_key, group in groups.items():
        if "down" not in group or "up" not in group:
            missing = down_suffix if "down" not in group else up_suffix
            raise ValueError(f"LoRA module {module_key!r} has no {missing} tensor")
    return groups


def _add_module(modules: dict[str, LoraModule], path: str, module: LoraModule, key: str) -> None:
    """Add one module; two keys naming the same module would silently drop one, so that is an error."""
    if path in modules:
        raise ValueError(f"LoRA key {key!r} adapts {path}, which another key in the file already adapts")
    modules[path] = module


def _read_diffusers(tensors, metadata, _adapter_config) -> dict[str, LoraModule]:
    configs = _component_configs(metadata)
    modules = {}
    for key, group in _pair_up(tensors, _SUFFIXES[DIFFUSERS], extra=(".alpha",)).items():
        component, path = _split_component(key, default="unet")
        path = canonical_path(component, path, key)
        alpha = float(group["alpha"]) if "alpha" in group else _config_alpha(configs.get(component), path, group["down"].shape[0])
        _add_module(modules, f"{component}.{path}", LoraModule(group["down"], group["up"], alpha), key)
    return modules


def _read_peft(tensors, metadata, adapter_config) -> dict[str, LoraModule]:
    config = dict(adapter_config or {})
    if not config and METADATA_KEY in metadata:
        config = json.loads(metadata[METADATA_KEY])
    modules = {}
    for key, group in _pair_up(tensors, _SUFFIXES[PEFT]).items():
        path = key.removeprefix("base_model.model.")
        component = "text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"
        path = canonical_path(component, path, key)
        _add_module(modules, f"{component}.{path}", LoraModule(group["down"], group["up"], _config_alpha(config or None, path, group["down"].shape[0])), key)
    return modules


def _read_kohya(tensors, _metadata, _adapter_config) -> dict[str, LoraModule]:
    ldm_table = LDM_KOHYA if has_ldm_names(tensors) else {}
    modules = {}
    for key, group in _pair_up(tensors, _SUFFIXES[KOHYA], extra=(".alpha",)).items():
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"LoRA key {key!r} maps to no module (kohya keys start with {', '.join(KOHYA_PREFIXES)})")
        component = KOHYA_PREFIXES[prefix]
        name = key[len(prefix):]
        if component == "unet" and ldm_table:
            name = ldm_to_diffusers(name, ldm_table, key)
        path = canonical_path(component, split_underscored(name, key), key)
        alpha = float(group["alpha"]) if "alpha" in group else None
        _add_module(modules, f"{component}.{path}", LoraModule(group["down"], group["up"], alpha), key)
    return modules


def _read_diffusers_old(tensors, _metadata, _adapter_config) -> dict[str, LoraModule]:
    # an alpha, where a converter stored one, sits beside the module: <component>.<path>.alpha
    alphas = {key: tensor for key, tensor in tensors.items() if key.endswith(".alpha")}
    weights = {key: tensor for key, tensor in tensors.items() if key not in alphas}
    modules: dict[str, LoraModule] = {}
    for key, group in _pair_up(weights, (".down.weight", ".up.weight")).items():
        component, path = _split_component(key, default="unet")
        endings = _OLD_UNET_ENDINGS if component == "unet" else _OLD_TEXT_ENCODER_ENDINGS
        ending = next((e for e in endings if path.endswith(e)), None)
        if ending is None:
            raise ValueError(f"LoRA key {key + '.down.weight'!r} maps to no module (old diffusers names end in {', '.join(e + '.down.weight' for e in endings)})")
        module_path = canonical_path(component, path[: -len(ending)].removesuffix(".processor") + endings[ending], key)
        alpha = alphas.pop(key[: -len(ending)] + ".alpha", None)
        _add_module(modules, f"{component}.{module_path}", LoraModule(group["down"], group["up"], None if alpha is None else float(alpha)), key)
    if alphas:
        raise ValueError(f"LoRA key {next(iter(alphas))!r} maps to no module (no .down.weight/.up.weight pair beside it)")
    return modules


def _split_component(key: str, default: str) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head in ("unet", "text_encoder", "text_encoder_2"):
        return head, rest
    return default, key


def _component_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig kwargs from diffusers' `lora_adapter_metadata` header ({'unet.r': 4, ...})."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"header {METADATA_KEY} is not valid JSON: {err}") from err
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _config_alpha(config: Mapping | None, path: str, rank: int) -> float | None:
    """Alpha of module `path` under a peft LoraConfig (alpha_pattern, rsLoRA folded in as alpha*sqrt(r))."""
    if not config:
        return None
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    for pattern, value in patterns.items():
        # peft's rule: a pattern matches a module name ending in it
        if re.match(rf"(.*\.)?({pattern})$", path) or re.match(rf"(.*\.)?({pattern})$", path.removeprefix("text_model.")):
            alpha = value
            break
    if alpha is None:
        return None
    alpha = float(alpha)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r) = (alpha*sqrt(r))/r
    return alpha


# ---------------------------------------------------------------- module paths


def canonical_path(component: str, path: str, key: str) -> str:
    """Component-relative module path as LoraState keeps it: text encoders always with `text_model.`."""
    if component.startswith("text_encoder"):
        if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
            path = "text_model." + path
        if not path.startswith(("text_model.", "text_projection")):  # text_projection: SDXL's second encoder
            raise ValueError(f"LoRA key {key!r} maps to no text-encoder module (expected text_model.encoder.layers...)")
    return path


def split_underscored(name: str, key: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in` by longest known segment."""
    parts = name.split("_")
    segments, i = [], 0
    while i < len(parts):
        for width in range(min(_MAX_SEGMENT_PARTS, len(parts) - i), 0, -1):
            candidate = "_".join(parts[i : i + width])
            if width == 1 or candidate in SEGMENTS:
                break
        if width == 1 and not re.fullmatch(r"[a-z]+[0-9]*|[0-9]+", candidate):
            raise ValueError(f"LoRA key {key!r} maps to no module (cannot read segment {candidate!r})")
        segments.append(candidate)
        i += width
    return ".".join(segments)


def resolve_module_path(path: str, module_names: set[str]) -> str | None:
    """Match a LoraState component path to the installed model's module names (with or without `text_model.`)."""
    if path in module_names:
        return path
    alternative = path.removeprefix("text_model.") if path.startswith("text_model.") else "text_model." + path
    return alternative if alternative in module_names else None


# ---------------------------------------------------------------- writing


def lora_config_kwargs(state: LoraState, component: str) -> dict:
    """peft LoraConfig kwargs for one component: the common rank/alpha plus per-module patterns."""
    # patterns without `text_model.` match both transformers 4 (text_model.encoder...) and 5 (encoder...) trees
    modules = {path.removeprefix("text_model."): m for path, m in state.for_component(component).items()}
    rank, alpha = state.most_common_rank_alpha(component)
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {path: m.rank for path, m in modules.items() if m.rank != rank},
        "alpha_pattern": {path: m.effective_alpha for path, m in modules.items() if m.effective_alpha != alpha},
        "target_modules": sorted(modules),
        "use_dora": False,
        "lora_bias": False,
    }


def to_diffusers_layers(state: LoraState) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """{component: (peft state dict without the component prefix, LoraConfig kwargs)} for save_lora_weights."""
    layers = {}
    for component in state.components():
        tensors = {}
        for path, module in state.for_component(component).items():
            tensors[f"{path}.lora_A.weight"] = module.down.contiguous()
            tensors[f"{path}.lora_B.weight"] = module.up.contiguous()
        layers[component] = (tensors, lora_config_kwargs(state, component))
    return layers


def to_diffusers(state: LoraState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers file's tensors and header, exactly as `save_lora_weights` writes them."""
    tensors, flat_config = {}, {}
    for component, (layers, config) in to_diffusers_layers(state).items():
        tensors.update({f"{component}.{key}": value for key, value in layers.items()})
        flat_config.update({f"{component}.{key}": value for key, value in config.items()})
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(flat_config, indent=2, sort_keys=True)}


def to_kohya(state: LoraState, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """kohya/A1111/ComfyUI tensors: lora_down/lora_up/alpha per module, `lora_te_` for SD1 text encoders."""
    prefixes = KOHYA_SDXL_WRITE_PREFIX if sdxl else KOHYA_WRITE_PREFIX
    tensors = {}
    for path, module in state.modules.items():
        component, _, module_path = path.partition(".")
        key = prefixes[component] + module_path.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{key}.lora_up.weight"] = module.up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(module.effective_alpha, dtype=torch.float32)
    return tensors
