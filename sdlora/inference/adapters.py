"""Load LoRAs into a diffusers pipeline (checked against the model first), set their weights, unload them.

Plain LoRA modules load as peft layers (diffusers' own loader), so weights change without touching the model. The
other kinds (LoHa, LoKr, full diffs, DoRA, Tucker-factored LoRA convs) are merged into the layers' weights in memory instead: the original
weights are kept, and every change of weight or unload recomputes the layers from them, so `unload_loras` gives the
exact original weights back.

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
from dataclasses import dataclass, field

import torch

from ..core import formats
from ..core.families import ModelFamily, denoiser_text_width, describe_model, family_of_pipeline, lora_architecture
from ..core.files import LoraFile, open_lora
from ..core.matching import ADAPTABLE_KINDS, base_layers, check_components, layers_of, match_lora
from ..core.state import Adapter, LoraModule, LoraState
from ..errors import UserError

_REGISTRY_ATTRIBUTE = "_sdlora_loras"  # {adapter name: LoadedLora} kept on the pipeline itself
_ORIGINALS_ATTRIBUTE = "_sdlora_original_weights"  # {(component, layer, param): tensor} of layers merged into


class LoraMatchWarning(UserWarning):
    """A LoRA matched only some of its modules to the model; the rest were skipped."""


@dataclass
class LoadedLora:
    """A LoRA loaded into a pipeline: its adapter name, weight, file hash (A1111 short hash) and module count;
    `merged`: its modules of kinds peft does not load, as (component, layer name, module), merged in memory."""

    name: str
    scale: float
    file_hash: str | None
    modules: int
    merged: list[tuple[str, str, Adapter]] = field(default_factory=list)
    in_peft: bool = True  # whether it has peft layers (plain LoRA modules)


# ---------------------------------------------------------------- loading


def load_lora(
    pipe,
    path_or_state: str | os.PathLike | LoraState | LoraFile,
    scale: float = 1.0,
    adapter_name: str | None = None,
    allow_pickle: bool = False,
) -> str:
    """Load a LoRA file (any supported format, or one already read with `open_lora`) or a `LoraState` into the
    pipeline's denoiser (UNet, or SD3's transformer) and text encoders.

    Returns the adapter name (default: the file stem, made unique). Other loaded LoRAs keep their weights.
    Raises ValueError if the LoRA matches none of the model's modules or a shape differs (another architecture);
    warns with `LoraMatchWarning` if only some modules match (those are skipped).
    """
    if isinstance(path_or_state, LoraState):
        state, label, file_hash, stem = path_or_state, "the LoRA", None, "lora"
    else:
        lora = path_or_state if isinstance(path_or_state, LoraFile) else open_lora(path_or_state, allow_pickle=allow_pickle)
        state, label, file_hash, stem = lora.state, str(lora.path), lora.file_hash, lora.path.stem
    _check_scale(scale)
    state.check_finite(label)
    name = _adapter_name(pipe, adapter_name, stem)
    match = _match_pipeline(state, pipe, label)
    loadable = _peft_components(pipe)
    plain = LoraState({p: m for p, (_, m) in match.modules.items() if _in_peft(p, m, loadable)}, dict(state.metadata))
    merged = [(p.partition(".")[0], layer, m) for p, (layer, m) in match.modules.items() if not _in_peft(p, m, loadable)]
    if len(plain):
        _load_into_components(pipe, plain, name, label)
    _registry(pipe)[name] = LoadedLora(name, float(scale), file_hash, len(match.modules), merged, in_peft=bool(len(plain)))
    for component, layer, _ in merged:
        _keep_original(pipe, component, layer)
    set_lora_scales(pipe, {name: scale})
    return name


def _in_peft(path: str, module: Adapter, loadable: tuple[str, ...]) -> bool:
    """Whether peft's LoRA layers can carry the module: plain LoRA, not a Tucker-factored conv (no `lora_mid` in peft),
    of a component diffusers' loader takes (SD3's loads no T5 LoRA: its modules are merged in memory instead)."""
    return isinstance(module, LoraModule) and module.mid is None and path.partition(".")[0] in loadable


def _peft_components(pipe) -> tuple[str, ...]:
    """The components the pipeline's diffusers LoRA loader takes (its `_lora_loadable_modules`)."""
    return tuple(getattr(pipe, "_lora_loadable_modules", None) or family_of_pipeline(pipe).components)


def pipeline_layers(pipe, family: ModelFamily) -> dict[str, dict]:
    """{component: {layer name: Layer}} of the pipeline's denoiser and text encoders, as the matcher sees them."""
    return {c: layers_of(getattr(pipe, c)) for c in family.components if getattr(pipe, c, None) is not None}


def describe_pipeline(pipe) -> str:
    """The model as error messages name it: `SD1.x (cross-attention width 768)`, `SD3 (text width 4096)`."""
    family = family_of_pipeline(pipe)
    return describe_model(family, denoiser_text_width(getattr(pipe, family.denoiser).config))


def match_to_pipeline(state: LoraState, pipe, label: str = "the LoRA") -> LoraState:
    """The modules of `state` the pipeline has, shaped like its layers; raise or warn about the others."""
    return _match_pipeline(state, pipe, label).state(state.metadata)


def matched_layers(state: LoraState, pipe, label: str = "the LoRA") -> dict[str, tuple[torch.nn.Module, Adapter]]:
    """{module path: (the pipeline's layer, the module fitted to it)} for the modules of `state` the pipeline has."""
    match = _match_pipeline(state, pipe, label)
    layers = {component: base_layers(getattr(pipe, component)) for component in {p.partition(".")[0] for p in match.modules}}
    return {path: (layers[path.partition(".")[0]][name], module) for path, (name, module) in match.modules.items()}


def _match_pipeline(state: LoraState, pipe, label: str):
    family = family_of_pipeline(pipe)
    check_components(state, family, label, describe_pipeline(pipe))
    layers = pipeline_layers(pipe, family)
    match = match_lora(state, layers, label, describe_pipeline(pipe))
    if not match.modules:
        adaptable = sum(layer.kind in ADAPTABLE_KINDS for component_layers in layers.values() for layer in component_layers.values())
        raise UserError(
            f"{label} matches none of the model's {adaptable} adaptable modules (first LoRA module: {match.unmatched[0]}); "
            f"it was made for {lora_architecture(state)}, and this model is {describe_pipeline(pipe)}"
        )
    if match.unmatched:
        warnings.warn(
            f"{label}: only {len(match.modules)} of its {len(state)} modules match this model; {len(match.unmatched)} are skipped (e.g. {match.unmatched[0]})",
            LoraMatchWarning,
            stacklevel=4,
        )
    return match


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
            if "transformer" in components:  # SD3's denoiser
                pipe.load_lora_into_transformer(tensors, transformer=pipe.transformer, adapter_name=name, metadata=metadata, _pipeline=pipe)
            for component in components:
                if component.startswith("text_encoder"):
                    pipe.load_lora_into_text_encoder(
                        tensors, network_alphas=None, text_encoder=getattr(pipe, component), prefix=component,
                        adapter_name=name, metadata=metadata, _pipeline=pipe,
                    )  # fmt: skip
        created = count_lora_layers(pipe, name)
        if created < len(state):
            raise UserError(f"{label}: diffusers created LoRA layers for only {created} of the {len(state)} matched modules")
    except Exception:
        _delete_adapter(pipe, name)
        raise


def count_lora_layers(pipe, adapter_name: str) -> int:
    """How many peft LoRA layers of `adapter_name` the pipeline's denoiser and text encoders hold."""
    from peft.tuners.lora import LoraLayer  # peft takes a second to import: only once adapters exist

    count = 0
    for component in family_of_pipeline(pipe).components:
        model = getattr(pipe, component, None)
        if model is not None:
            count += sum(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in model.modules())
    return count


# ---------------------------------------------------------------- names and weights


def _registry(pipe) -> dict[str, LoadedLora]:
    """sdlora's record of the LoRAs in `pipe`, pruned of adapters deleted through diffusers directly."""
    registry = getattr(pipe, _REGISTRY_ATTRIBUTE, None)
    if registry is None:
        registry = {}
        setattr(pipe, _REGISTRY_ATTRIBUTE, registry)
    present = _present_adapters(pipe)
    for name in [n for n, lora in registry.items() if lora.in_peft and n not in present]:
        del registry[name]
    return registry


def _present_adapters(pipe) -> list[str]:
    names: list[str] = []
    for adapters in pipe.get_list_adapters().values():
        names.extend(n for n in adapters if n not in names)
    return names


def _adapter_name(pipe, requested: str | None, stem: str) -> str:
    # peft keeps adapters in ModuleDicts, whose keys cannot contain '.' nor be nn.Module attributes ('half', 'to')
    present = set(_present_adapters(pipe)) | set(_registry(pipe))
    if requested is not None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", requested) or hasattr(torch.nn.Module, requested):
            raise UserError(f"adapter name {requested!r} must hold only letters, digits, '_' and '-' and not be a torch Module attribute")
        if requested in present:
            raise UserError(f"adapter name {requested!r} is already loaded: pick another or unload it first")
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
        raise UserError(f"LoRA scale must be a finite number, got {scale}")


def set_lora_scales(pipe, scales: dict[str, float]) -> None:
    """Set the weight of the named LoRAs; the other loaded LoRAs keep theirs."""
    registry = _registry(pipe)
    present = _present_adapters(pipe)
    for name, scale in scales.items():
        if name not in present and name not in registry:
            loaded = present + [n for n in registry if n not in present]
            raise UserError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'})")
        _check_scale(scale)
    for name, scale in scales.items():
        if name in registry:
            registry[name].scale = float(scale)
        else:  # loaded through diffusers directly: start tracking it
            registry[name] = LoadedLora(name, float(scale), None, count_lora_layers(pipe, name))
    if present:
        # adapters loaded outside sdlora and never scaled here count as weight 1, diffusers' own default
        pipe.set_adapters(present, [registry[n].scale if n in registry else 1.0 for n in present])
    if any(registry[name].merged for name in scales):
        _remerge(pipe)


def loaded_loras(pipe) -> list[LoadedLora]:
    """The LoRAs loaded through sdlora, in loading order, with their current weights."""
    return list(_registry(pipe).values())


def unload_loras(pipe) -> None:
    """Remove every LoRA from the pipeline, restoring the base model (merged kinds: its exact original weights)."""
    pipe.unload_lora_weights()
    setattr(pipe, _REGISTRY_ATTRIBUTE, {})
    _remerge(pipe)  # no LoRA left: every merged layer gets its original weights back
    setattr(pipe, _ORIGINALS_ATTRIBUTE, {})


# ---------------------------------------------------------------- kinds merged in memory


def _layer(pipe, component: str, layer: str) -> torch.nn.Module:
    return base_layers(getattr(pipe, component))[layer]


def _keep_original(pipe, component: str, layer: str) -> None:
    """Keep a copy of the layer's weight (and bias) as it was before any merge, once."""
    originals = getattr(pipe, _ORIGINALS_ATTRIBUTE, None)
    if originals is None:
        originals = {}
        setattr(pipe, _ORIGINALS_ATTRIBUTE, originals)
    module = _layer(pipe, component, layer)
    for param in ("weight", "bias"):
        tensor = getattr(module, param, None)
        if isinstance(tensor, torch.Tensor) and (component, layer, param) not in originals:
            originals[(component, layer, param)] = tensor.detach().clone()


@torch.no_grad()
def _remerge(pipe) -> None:
    """Every merged layer recomputed from its original weights with the loaded LoRAs' merged modules at their
    current weights, in loading order (in fp32, cast to the layer's dtype)."""
    originals = getattr(pipe, _ORIGINALS_ATTRIBUTE, {})
    updates: dict[tuple[str, str, str], list[tuple[Adapter, float]]] = {}
    for lora in _registry(pipe).values():
        for component, layer, module in lora.merged:
            updates.setdefault((component, layer, "weight"), []).append((module, lora.scale))
            bias = module.bias_update()
            if bias is not None:
                updates.setdefault((component, layer, "bias"), []).append((bias, lora.scale))
    for (component, layer, param), original in originals.items():
        work = original.to(torch.float32).clone()
        for module, scale in updates.get((component, layer, param), []):
            work = module.apply(work, scale)
        getattr(_layer(pipe, component, layer), param).copy_(work.to(original.dtype))


def _delete_adapter(pipe, name: str) -> None:
    if name in _present_adapters(pipe):
        pipe.delete_adapters(name)
