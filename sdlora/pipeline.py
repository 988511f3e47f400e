"""Load LoRAs into a StableDiffusionPipeline (checked against the model first) and set their weights.

A LoRA whose modules the model does not have is the most common reason a LoRA "does nothing", and diffusers
skips such keys silently. So every LoRA is matched module by module before diffusers sees it: none matched or a
shape that differs is an error naming the architecture the LoRA was made for; a partial match is a warning with
the count; afterwards the LoRA layers peft actually created are counted.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats
from .inspection import guess_architecture
from .lora import base_layers
from .state import LoraModule, LoraState

LOADABLE_COMPONENTS = ("unet", "text_encoder")
ADAPTABLE_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
_REGISTRY_ATTRIBUTE = "_sdlora_loras"  # {adapter name: LoadedLora} kept on the pipeline itself


class LoraMatchWarning(UserWarning):
    """A LoRA matched only some of its modules to the model; the rest were skipped."""


@dataclass
class LoadedLora:
    """A LoRA loaded into a pipeline: its adapter name, weight, file hash (A1111 short hash) and module count."""

    name: str
    scale: float
    file_hash: str | None
    modules: int


# ---------------------------------------------------------------- loading


def load_lora(
    pipe,
    path_or_state: str | os.PathLike | LoraState,
    scale: float = 1.0,
    adapter_name: str | None = None,
    allow_pickle: bool = False,
) -> str:
    """Load a LoRA file (any supported format) or `LoraState` into the pipeline's UNet and text encoder.

    Returns the adapter name (default: the file stem, made unique). Other loaded LoRAs keep their weights.
    Raises ValueError if the LoRA matches none of the model's modules or a shape differs (another architecture);
    warns with `LoraMatchWarning` if only some modules match (those are skipped).
    """
    from .images import lora_file_hash
    from .lorafile import read_lora

    if isinstance(path_or_state, LoraState):
        state, label, file_hash, stem = path_or_state, "the LoRA", None, "lora"
    else:
        state = read_lora(path_or_state, allow_pickle=allow_pickle)
        label, file_hash, stem = str(path_or_state), lora_file_hash(path_or_state), Path(path_or_state).stem
    _check_scale(scale)
    state.check_finite(label)
    name = _adapter_name(pipe, adapter_name, stem)
    matched = match_to_pipeline(state, pipe, label)
    _load_into_components(pipe, matched, name, label)
    _registry(pipe)[name] = LoadedLora(name, float(scale), file_hash, len(matched))
    set_lora_scales(pipe, {name: scale})
    return name


def match_to_pipeline(state: LoraState, pipe, label: str = "the LoRA") -> LoraState:
    """The modules of `state` the pipeline has, shaped like its layers; raise or warn about the others."""
    model_modules = {c: base_layers(getattr(pipe, c)) for c in LOADABLE_COMPONENTS if getattr(pipe, c, None) is not None}
    module_names = {c: set(modules) for c, modules in model_modules.items()}
    adaptable = sum(isinstance(m, ADAPTABLE_LAYERS) for modules in model_modules.values() for m in modules.values())
    if "text_encoder_2" in state.components():
        raise ValueError(f"{label} has modules for a second text encoder (text_encoder_2), which only SDXL has; it was made for {_lora_architecture(state)}, and this model is {_model_architecture(pipe)}")
    matched: dict[str, LoraModule] = {}
    unmatched: list[str] = []
    for path, module in state.modules.items():
        component, _, module_path = path.partition(".")
        resolved = formats.resolve_module_path(module_path, module_names.get(component, set()))
        if resolved is None:
            unmatched.append(path)
            continue
        layer = model_modules[component][resolved]
        if not isinstance(layer, ADAPTABLE_LAYERS):
            raise ValueError(f"{label}: module {path} is a {type(layer).__name__} in this model, which LoRA cannot adapt (only Linear and Conv2d)")
        fitted = _fit_to_layer(module, layer)
        if fitted is None:
            raise ValueError(
                f"{label}: module {path} adapts a weight of shape {tuple(module.weight_shape())}, but the model's is {tuple(layer.weight.shape)}: "
                f"the LoRA was made for {_lora_architecture(state)}, and this model is {_model_architecture(pipe)}"
            )
        matched[path] = fitted
    if not matched:
        raise ValueError(
            f"{label} matches none of the model's {adaptable} adaptable modules (first LoRA module: {unmatched[0]}); "
            f"it was made for {_lora_architecture(state)}, and this model is {_model_architecture(pipe)}"
        )
    if unmatched:
        warnings.warn(
            f"{label}: only {len(matched)} of its {len(state)} modules match this model; {len(unmatched)} are skipped (e.g. {unmatched[0]})",
            LoraMatchWarning,
            stacklevel=3,
        )
    return LoraState(matched, dict(state.metadata))


def _fit_to_layer(module: LoraModule, layer: torch.nn.Module) -> LoraModule | None:
    """`module` reshaped to the layer's kind (a 1x1 conv and a Linear are the same map), or None if shapes differ."""
    weight_shape = tuple(layer.weight.shape)
    if module.weight_shape() == weight_shape:
        return module
    flat_lora, flat_layer = _without_unit_kernel(module.weight_shape()), _without_unit_kernel(weight_shape)
    if flat_lora is None or flat_lora != flat_layer:
        return None
    # SD1 UNets have 1x1-conv proj_in/proj_out, SD2 ones Linear: files of either kind fit either model
    if isinstance(layer, torch.nn.Conv2d):
        return LoraModule(module.down.reshape(*module.down.shape[:2], 1, 1), module.up.reshape(*module.up.shape[:2], 1, 1), module.alpha)
    return LoraModule(module.down.reshape(module.down.shape[:2]), module.up.reshape(module.up.shape[:2]), module.alpha)


def _without_unit_kernel(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(shape) == 2:
        return shape
    return shape[:2] if shape[2:] == (1, 1) else None


def _load_into_components(pipe, state: LoraState, name: str, label: str) -> None:
    """Hand the matched modules to diffusers with their LoraConfig (per-module alpha), then count what peft made."""
    tensors, header = formats.to_diffusers(state)
    # a dict input carries no file header, so the LoraConfig kwargs go in as `metadata` (else alpha is lost)
    metadata = json.loads(header[formats.METADATA_KEY])
    components = state.components()
    try:
        with warnings.catch_warnings():
            # peft warns on every second adapter that several adapters share the model: that is what we want
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if "unet" in components:
                pipe.load_lora_into_unet(tensors, network_alphas=None, unet=pipe.unet, adapter_name=name, metadata=metadata, _pipeline=pipe)
            if "text_encoder" in components:
                pipe.load_lora_into_text_encoder(tensors, network_alphas=None, text_encoder=pipe.text_encoder, adapter_name=name, metadata=metadata, _pipeline=pipe)
        created = count_lora_layers(pipe, name)
        if created < len(state):
            raise ValueError(f"{label}: diffusers created LoRA layers for only {created} of the {len(state)} matched modules")
    except Exception:
        _delete_adapter(pipe, name)
        raise


def count_lora_layers(pipe, adapter_name: str) -> int:
    """How many peft LoRA layers of `adapter_name` the pipeline's UNet and text encoder hold."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for component in LOADABLE_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            count += sum(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in model.modules())
    return count


def _lora_architecture(state: LoraState) -> str:
    architecture = guess_architecture(state)
    widths = [int(m.down.shape[1]) for p, m in state.modules.items() if p.startswith("unet.") and p.endswith(("attn2.to_k", "attn2.to_v"))]
    if widths and not architecture.startswith("unknown"):
        return f"{architecture} (cross-attention width {widths[0]})"
    if architecture.startswith("unknown"):
        return f"an architecture sdlora cannot tell ({architecture.removeprefix('unknown').strip(' ()')})"
    return architecture


def _model_architecture(pipe) -> str:
    width = pipe.unet.config.cross_attention_dim
    known = {768: "SD1.x", 1024: "SD2.x"}
    return f"{known[width]} (cross-attention width {width})" if width in known else f"a Stable Diffusion model of cross-attention width {width}"


# ---------------------------------------------------------------- names and weights


def _registry(pipe) -> dict[str, LoadedLora]:
    """sdlora's record of the LoRAs in `pipe`, pruned of adapters deleted through diffusers directly."""
    registry = getattr(pipe, _REGISTRY_ATTRIBUTE, None)
    if registry is None:
        registry = {}
        setattr(pipe, _REGISTRY_ATTRIBUTE, registry)
    present = _present_adapters(pipe)
    for name in [n for n in registry if n not in present]:
        del registry[name]
    return registry


def _present_adapters(pipe) -> list[str]:
    names: list[str] = []
    for adapters in pipe.get_list_adapters().values():
        names.extend(n for n in adapters if n not in names)
    return names


def _adapter_name(pipe, requested: str | None, stem: str) -> str:
    # peft keeps adapters in ModuleDicts, whose keys cannot contain '.' nor be nn.Module attributes ('half', 'to')
    present = set(_present_adapters(pipe))
    if requested is not None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", requested) or hasattr(torch.nn.Module, requested):
            raise ValueError(f"adapter name {requested!r} must hold only letters, digits, '_' and '-' and not be a torch Module attribute")
        if requested in present:
            raise ValueError(f"adapter name {requested!r} is already loaded: pick another or unload it first")
        return requested
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "lora"
    if hasattr(torch.nn.Module, base):
        base += "_lora"
    name, number = base, 2
    while name in present:
        name, number = f"{base}_{number}", number + 1
    return name


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")


def set_lora_scales(pipe, scales: dict[str, float]) -> None:
    """Set the weight of the named LoRAs; the other loaded LoRAs keep theirs."""
    registry = _registry(pipe)
    present = _present_adapters(pipe)
    for name, scale in scales.items():
        if name not in present:
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(present) or 'none'})")
        _check_scale(scale)
    for name, scale in scales.items():
        if name in registry:
            registry[name].scale = float(scale)
        else:  # loaded through diffusers directly: start tracking it
            registry[name] = LoadedLora(name, float(scale), None, count_lora_layers(pipe, name))
    # adapters loaded outside sdlora and never scaled here count as weight 1, diffusers' own default
    weights = [registry[n].scale if n in registry else 1.0 for n in present]
    pipe.set_adapters(present, weights)


def loaded_loras(pipe) -> list[LoadedLora]:
    """The LoRAs loaded through sdlora, in loading order, with their current weights."""
    return list(_registry(pipe).values())


def unload_loras(pipe) -> None:
    """Remove every LoRA from the pipeline, restoring the base model."""
    pipe.unload_lora_weights()
    setattr(pipe, _REGISTRY_ATTRIBUTE, {})


def _delete_adapter(pipe, name: str) -> None:
    if name in _present_adapters(pipe):
        pipe.delete_adapters(name)
