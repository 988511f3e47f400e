"""Read a state dict of any supported format into a `LoraState`; a key that maps to nothing raises naming it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from ...errors import UserError
from ..kinds import KIND_NAMES, DoraModule, build_adapter
from ..state import Adapter, LoraState
from .detect import detect_format
from .ldm import LDM_KOHYA, has_ldm_names, ldm_to_diffusers
from .mmdit import from_mmdit, is_mmdit_path
from .names import (
    ATTN_PROCS,
    DIFFUSERS,
    DIFFUSERS_OLD,
    FORMATS,
    KIND_KEYS,
    KIND_REQUIRED,
    KOHYA,
    KOHYA_ALPHA,
    KOHYA_LDM,
    KOHYA_PREFIXES,
    METADATA_KEY,
    OLD_SUFFIXES,
    OLD_TEXT_ENCODER_ENDINGS,
    OLD_TEXT_ENCODER_MAGNITUDE_ENDINGS,
    OLD_UNET_ENDINGS,
    OLD_UNET_MAGNITUDE_ENDINGS,
    PEFT,
    PEFT_MAGNITUDE,
    SHARED_KEYS,
    SUFFIXES,
    TRANSFORMER_FIRST_NAMES,
    canonical_path,
    peft_pattern_matches,
    split_component,
    split_kohya_name,
)


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
        raise UserError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    modules = readers[fmt](dict(tensors), metadata, adapter_config)
    if not modules:
        raise UserError("the file holds no LoRA modules")
    return LoraState(dict(sorted(modules.items())), metadata)


def _pair_up(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, str], extra: tuple[str, ...] = (), magnitude: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Group keys by module: {module_key: {"down": t, "up": t, "alpha": t, "magnitude": t}}; raise on any other key."""
    down_suffix, up_suffix = suffixes
    roles = [("down", down_suffix), ("up", up_suffix), *(("alpha", s) for s in extra)]
    roles += [("magnitude", "." + s) for s in PEFT_MAGNITUDE] if magnitude else []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for role, suffix in roles:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            raise UserError(
                f"LoRA key {key!r} maps to no module (expected a name ending in {down_suffix}, {up_suffix}{''.join(', ' + s for s in extra)})"
            )
    for module_key, group in groups.items():
        if "down" not in group or "up" not in group:
            missing = down_suffix if "down" not in group else up_suffix
            raise UserError(f"LoRA module {module_key!r} has no {missing} tensor")
    return groups


def _add_module(modules: dict[str, Adapter], path: str, module: Adapter, key: str) -> None:
    """Add one module; two keys naming the same module would silently drop one, so that is an error."""
    if path in modules:
        raise UserError(f"LoRA key {key!r} adapts {path}, which another key in the file already adapts")
    modules[path] = module


def _read_diffusers(tensors, metadata, _adapter_config) -> dict[str, Adapter]:
    configs = _component_configs(metadata)
    modules: dict[str, Adapter] = {}
    for key, group in _pair_up(tensors, SUFFIXES[DIFFUSERS], extra=(KOHYA_ALPHA,), magnitude=True).items():
        component, path = split_component(key, default="unet")
        path = canonical_path(component, path, key)
        alpha = float(group["alpha"]) if "alpha" in group else _config_alpha(configs.get(component), path, group["down"].shape[0])
        _add_module(modules, f"{component}.{path}", _lora_or_dora(group, alpha, key), key)
    return modules


def _lora_or_dora(group: dict[str, torch.Tensor], alpha: float | None, key: str) -> Adapter:
    """A LoRA module, or peft's DoRA of it when the file holds its `lora_magnitude_vector`: per output row, as peft
    has no other axis (a conv's [1, out, 1, 1] is no LyCORIS [1, in, 1, 1], even where out == in)."""
    magnitude = group.get("magnitude")
    try:
        lora = build_adapter("lora", {"down": group["down"], "up": group["up"]}, alpha)
        return lora if magnitude is None else DoraModule(lora, magnitude, on_output=True)
    except ValueError as err:
        raise UserError(f"LoRA module {key!r} ({'DoRA' if magnitude is not None else 'LoRA'}): {err}") from None


def _read_peft(tensors, metadata, adapter_config) -> dict[str, Adapter]:
    config = dict(adapter_config or {})
    if not config and METADATA_KEY in metadata:
        config = json.loads(metadata[METADATA_KEY])
    modules: dict[str, Adapter] = {}
    for key, group in _pair_up(tensors, SUFFIXES[PEFT], magnitude=True).items():
        path = key.removeprefix("base_model.model.")
        component = "text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"
        if path.split(".", 1)[0] in TRANSFORMER_FIRST_NAMES:
            component = "transformer"  # an SD3 transformer's adapter (ComfyUI reads these for SD3)
        path = canonical_path(component, path, key)
        _add_module(
            modules, f"{component}.{path}", _lora_or_dora(group, _config_alpha(config or None, path, group["down"].shape[0]), key), key
        )
    return modules


def _read_kohya(tensors, _metadata, _adapter_config) -> dict[str, Adapter]:
    ldm_table = LDM_KOHYA if has_ldm_names(tensors) else {}
    modules: dict[str, Adapter] = {}
    for key, adapter in _adapters_by_kind(tensors).items():
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
        if prefix is None:
            raise UserError(f"LoRA key {key!r} maps to no module (kohya keys start with {', '.join(KOHYA_PREFIXES)})")
        component = KOHYA_PREFIXES[prefix]
        name = key[len(prefix) :]
        if component == "unet" and ldm_table:
            name = ldm_to_diffusers(name, ldm_table, key)
        path = split_kohya_name(name, key)
        if component == "unet" and is_mmdit_path(path):
            # kohya's SD3: lora_unet_ + SAI's MMDiT names, q/k/v fused: the transformer's modules under diffusers' paths
            for module_path, module in from_mmdit(path, adapter, key).items():
                _add_module(modules, f"transformer.{module_path}", module, key)
            continue
        _add_module(modules, f"{component}.{canonical_path(component, path, key)}", adapter, key)
    return modules


# every key suffix a kohya/LyCORIS module may have, longest first (so `diff_b` is not taken for `diff`)
_KIND_SUFFIXES = sorted(
    [(suffix, kind, field) for kind, table in KIND_KEYS.items() if kind != "boft" for suffix, field in table.items()]
    + [(suffix, None, field) for suffix, field in SHARED_KEYS.items()],
    key=lambda entry: len(entry[0]),
    reverse=True,
)
# kinds sdlora recognises in a key but cannot apply, named in the refusal instead of a bare key
_UNREADABLE_KINDS = {
    ".oft_diag": "OFT from LyCORIS before 2.0 (oft_diag)",
    ".w_norm": "norm-layer weights (LyCORIS norms)",
    ".b_norm": "norm-layer weights (LyCORIS norms)",
}


def _adapters_by_kind(tensors: dict[str, torch.Tensor]) -> dict[str, Adapter]:
    """{module key: adapter} of a kohya/LyCORIS state dict, the kind of each module told by its tensors' names."""
    groups: dict[str, dict] = {}
    for key, tensor in tensors.items():
        entry = next((entry for entry in _KIND_SUFFIXES if key.endswith("." + entry[0])), None)
        if entry is None:
            kind = next((name for marker, name in _UNREADABLE_KINDS.items() if key.endswith(marker)), None)
            if kind is not None:
                raise UserError(
                    f"{kind} weights (key {key!r}) are not supported: sdlora reads LoRA, LoCon, LoHa, LoKr, DoRA, full diffs, OFT, BOFT, IA3 and GLoRA"
                )
            raise UserError(
                f"LoRA key {key!r} maps to no module (no tensor name sdlora knows: {', '.join(s for s, _, _ in _KIND_SUFFIXES)})"
            )
        suffix, kind, field = entry
        group = groups.setdefault(key[: -len(suffix) - 1], {"kinds": set(), "fields": {}, "shared": {}, "names": []})
        group["names"].append(suffix)
        if kind is None:
            group["shared"][field] = tensor
        else:
            group["kinds"].add(kind)
            group["fields"][field] = tensor
    adapters: dict[str, Adapter] = {}
    for module_key, group in groups.items():
        kinds = sorted(group["kinds"])
        found = ", ".join(sorted(group["names"]))
        if len(kinds) != 1:
            named = " and ".join(KIND_NAMES[k] for k in kinds) if kinds else "no weights"
            raise UserError(f"LoRA module {module_key!r} holds {named} ({found}): a module is of one kind")
        kind = kinds[0]
        if kind == "ia3" and "on_input" not in group["fields"]:  # a lone `<name>.weight` is no IA3 but an unknown key
            raise UserError(
                f"LoRA key {module_key + '.weight'!r} maps to no module (no tensor name sdlora knows: {', '.join(s for s, _, _ in _KIND_SUFFIXES)})"
            )
        keys = {field: suffix for suffix, field in KIND_KEYS[kind].items()}
        missing = [keys[field] for field in KIND_REQUIRED[kind] if field not in group["fields"]]
        if missing:
            raise UserError(f"LoRA module {module_key!r} ({KIND_NAMES[kind]}: {found}) has no {missing[0]} tensor")
        alpha = group["shared"].get("alpha")
        try:
            adapters[module_key] = build_adapter(
                kind, group["fields"], None if alpha is None else float(alpha), group["shared"].get("magnitude")
            )
        except ValueError as err:
            kind_name = KIND_NAMES[kind] + (" with DoRA" if "magnitude" in group["shared"] else "")
            raise UserError(f"LoRA module {module_key!r} ({kind_name}: {found}): {err}") from None
    return adapters


def _read_diffusers_old(tensors, metadata, _adapter_config) -> dict[str, Adapter]:
    """Old diffusers and attention-processor names, with what diffusers' `convert_state_dict_to_diffusers` leaves in
    peft's names beside them (the other modules' lora_A/lora_B, every DoRA magnitude)."""
    magnitude_suffixes = tuple("." + suffix for suffix in PEFT_MAGNITUDE)
    accepted = (*OLD_SUFFIXES, *SUFFIXES[DIFFUSERS], *magnitude_suffixes, KOHYA_ALPHA)
    stray = next((key for key in tensors if not key.endswith(accepted)), None)
    if stray is not None:
        raise UserError(f"LoRA key {stray!r} maps to no module (expected a name ending in {', '.join(accepted)})")
    # an alpha, where a converter stored one, sits beside the module: <component>.<path>.alpha
    alphas = {key: tensor for key, tensor in tensors.items() if key.endswith(KOHYA_ALPHA)}
    magnitudes = {key: tensor for key, tensor in tensors.items() if key.endswith(magnitude_suffixes)}
    peft_named = {key: tensor for key, tensor in tensors.items() if key.endswith(SUFFIXES[DIFFUSERS])}
    old_named = {key: tensor for key, tensor in tensors.items() if key not in alphas and key not in magnitudes and key not in peft_named}
    groups: dict[str, dict] = {}  # component.path -> {"down", "up", "alpha", and "magnitude" for a DoRA}

    def add_group(path: str, key: str, group: dict, alpha: torch.Tensor | None) -> None:
        if path in groups:
            raise UserError(f"LoRA key {key!r} adapts {path}, which another key in the file already adapts")
        groups[path] = {"down": group["down"], "up": group["up"], "alpha": alpha}

    for key, group in _pair_up(old_named, OLD_SUFFIXES).items():
        component, path = split_component(key, default="unet")
        endings = OLD_UNET_ENDINGS if component == "unet" else OLD_TEXT_ENCODER_ENDINGS
        ending = next((e for e in endings if path.endswith(e)), None)
        if ending is None:
            raise UserError(
                f"LoRA key {key + '.down.weight'!r} maps to no module (old diffusers names end in {', '.join(e + '.down.weight' for e in endings)})"
            )
        module_path = canonical_path(component, path[: -len(ending)].removesuffix(".processor") + endings[ending], key)
        add_group(f"{component}.{module_path}", key, group, alphas.pop(key[: -len(ending)] + KOHYA_ALPHA, None))
    for key, group in _pair_up(peft_named, SUFFIXES[DIFFUSERS]).items():
        component, path = split_component(key, default="unet")
        add_group(f"{component}.{canonical_path(component, path, key)}", key, group, alphas.pop(key + KOHYA_ALPHA, None))
    if alphas:
        raise UserError(f"LoRA key {next(iter(alphas))!r} maps to no module (no .down.weight/.up.weight pair beside it)")
    for key, magnitude in magnitudes.items():
        suffix = next(s for s in magnitude_suffixes if key.endswith(s))
        component, path = split_component(key[: -len(suffix)], default="unet")
        endings = OLD_UNET_MAGNITUDE_ENDINGS if component == "unet" else OLD_TEXT_ENCODER_MAGNITUDE_ENDINGS
        ending = next((e for e in endings if path.endswith(e)), None)
        if ending is not None:
            path = path[: -len(ending)].removesuffix(".processor") + endings[ending]
        module = f"{component}.{canonical_path(component, path, key)}"
        if module not in groups:
            raise UserError(f"LoRA key {key!r} maps to no module (no LoRA down/up pair for {module} in the file)")
        if "magnitude" in groups[module]:
            raise UserError(f"LoRA key {key!r} is a second DoRA magnitude for {module}")
        groups[module]["magnitude"] = magnitude
    configs = _component_configs(metadata)  # diffusers applies the header's LoraConfig whatever the keys' names
    modules: dict[str, Adapter] = {}
    for path, group in groups.items():
        component, _, module_path = path.partition(".")
        stored = group["alpha"]
        alpha = float(stored) if stored is not None else _config_alpha(configs.get(component), module_path, group["down"].shape[0])
        modules[path] = _lora_or_dora(group, alpha, path)
    return modules


def _component_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig kwargs from diffusers' `lora_adapter_metadata` header ({'unet.r': 4, ...})."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise UserError(f"header {METADATA_KEY} is not valid JSON: {err}") from err
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
        if peft_pattern_matches(pattern, path) or peft_pattern_matches(pattern, path.removeprefix("text_model.")):
            alpha = value
            break
    if alpha is None:
        return None
    alpha = float(alpha)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r) = (alpha*sqrt(r))/r
    return alpha
