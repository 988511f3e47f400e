"""The one matcher: which model layer each `LoraState` module adapts, and whether it fits.

Loading into a pipeline, merging (into a pipeline, a diffusers folder or a single file) and `--init-lora` all
resolve modules here: the `text_model.` spelling of text-encoder paths (transformers 5 dropped the level from
CLIPTextModel), a 1x1 conv standing for a Linear and the other way round, the shape check, and the error naming
the architecture the LoRA was made for against the model's.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..errors import UserError
from .families import ModelFamily, lora_architecture
from .kinds import KIND_NAMES
from .state import Adapter, LoraModule, LoraState

ADAPTABLE_LAYERS = (nn.Linear, nn.Conv2d)
ADAPTABLE_KINDS = ("Linear", "Conv2d")
TEXT_MODEL_PREFIX = "text_model."


@dataclass(frozen=True)
class Layer:
    """What the matcher needs of a model layer: the shape of its weight and its kind (None: only weights known)."""

    shape: tuple[int, ...]
    kind: str | None = None


class LayerLookup(Protocol):
    """One component's layers by name: a dict, or a view that looks names up in a checkpoint's own naming."""

    def __contains__(self, name: object) -> bool: ...

    def __getitem__(self, name: str) -> Layer: ...


@dataclass
class Match:
    """The modules of a LoRA that matched, each fitted to its layer's shape, and those that matched nothing."""

    modules: dict[str, tuple[str, Adapter]] = field(default_factory=dict)  # LoraState path -> (layer name, module)
    unmatched: list[str] = field(default_factory=list)

    def require_all(self, label: str, where: str) -> None:
        """Raise naming the first module that matched no weight of `where`."""
        if self.unmatched:
            raise UserError(f"{label}: LoRA module {self.unmatched[0]} matches no weight in {where}")

    def state(self, metadata: Mapping[str, str] | None = None) -> LoraState:
        """The matched modules as a LoraState under their original paths."""
        return LoraState({path: module for path, (_, module) in self.modules.items()}, dict(metadata or {}))


def base_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers by name as before any LoRA: a peft layer stands for its base, its inner layers are skipped."""
    from peft.tuners.lora import LoraLayer  # peft takes a second to import; only models with adapters need it

    layers: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue  # base_layer, lora_A, lora_B... of a layer already listed
        if isinstance(module, LoraLayer):
            wrapped.append(name + ".")
            module = module.get_base_layer()
        layers[name] = module
    return layers


def layers_of(model: nn.Module) -> dict[str, Layer]:
    """Every module of `model` as the matcher sees it: its weight's shape (none: `()`) and its kind."""
    layers = {}
    for name, module in base_layers(model).items():
        weight = getattr(module, "weight", None)
        kind = next((k for k, cls in zip(ADAPTABLE_KINDS, ADAPTABLE_LAYERS) if isinstance(module, cls)), type(module).__name__)
        layers[name] = Layer(tuple(weight.shape) if isinstance(weight, torch.Tensor) else (), kind)
    return layers


def resolve_module_path(path: str, module_names: Container[str]) -> str | None:
    """Match a LoraState component path to the installed model's module names (with or without `text_model.`)."""
    if path in module_names:
        return path
    alternative = path.removeprefix(TEXT_MODEL_PREFIX) if path.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + path
    return alternative if alternative in module_names else None


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1 conv weight [out, in, 1, 1] is the same map as a Linear [out, in]."""
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def fit_to_shape(module: Adapter, shape: tuple[int, ...]) -> Adapter | None:
    """`module` reshaped to a layer of weight `shape` (SD1's 1x1-conv proj_in is SD2's Linear), or None if it differs.

    A plain LoRA is reshaped (it loads as a peft layer of the layer's kind); the other kinds apply their update to
    the weight in whatever shape it has and say themselves what they fit (`fits`)."""
    shape = tuple(shape)
    if module.weight_shape() == shape:
        return module
    if not isinstance(module, LoraModule):
        return module if module.fits(shape) else None
    if squeezed(module.weight_shape()) != squeezed(shape) or len(squeezed(shape)) != 2:
        return None
    if len(shape) == 4:
        return LoraModule(module.down.reshape(*module.down.shape[:2], 1, 1), module.up.reshape(*module.up.shape[:2], 1, 1), module.alpha)
    return LoraModule(module.down.reshape(module.down.shape[:2]), module.up.reshape(module.up.shape[:2]), module.alpha)


def _kind_label(module: Adapter) -> str:
    return "LoRA" if module.kind == "lora" else KIND_NAMES[module.kind]


def _shape_text(shape: tuple[int | None, ...]) -> str:
    """[320, 768], with `any` where the update takes the layer's size (an OFT's input width)."""
    return "[" + ", ".join("any" if size is None else str(size) for size in shape) + "]"


def check_components(state: LoraState, family: ModelFamily, label: str, model_description: str) -> None:
    """Refuse a LoRA with modules for a component the model's family does not have (an SDXL LoRA's second text
    encoder in an SD1 model), naming both architectures."""
    extra = [component for component in state.components() if component not in family.components]
    if extra:
        raise UserError(
            f"{label} has modules for {extra[0]}, which {family.label} models do not have; "
            f"it was made for {lora_architecture(state)}, and this model is {model_description}"
        )


def match_lora(
    state: LoraState, layers: Mapping[str, LayerLookup], label: str, model_description: str, made_for: str | None = None
) -> Match:
    """Resolve every module of `state` against `layers` ({component: {layer name: Layer}}).

    A module whose layer exists but cannot take LoRA, or whose update has another shape, is an error naming the
    architecture the LoRA was made for (`made_for`, default: judged from `state`) and `model_description`; modules
    with no layer are listed in `unmatched` for the caller to refuse (merge) or warn about (loading).
    """
    made_for = made_for or lora_architecture(state)
    match = Match()
    for path, module in state.modules.items():
        component, _, module_path = path.partition(".")
        component_layers = layers.get(component, {})  # a component the model lacks: every module unmatched
        name = resolve_module_path(module_path, component_layers)
        if name is None:
            match.unmatched.append(path)
            continue
        layer = component_layers[name]
        if layer.kind is not None and layer.kind not in ADAPTABLE_KINDS:
            raise UserError(f"{label}: module {path} is a {layer.kind} in this model, which LoRA cannot adapt (only Linear and Conv2d)")
        fitted = fit_to_shape(module, layer.shape)
        if fitted is None:
            raise UserError(
                f"{label}: {_kind_label(module)} module {path} makes a {_shape_text(module.weight_shape())} update but weight {component}.{name}.weight is {list(layer.shape)}: "
                f"the LoRA was made for {made_for}, and this model is {model_description}"
            )
        match.modules[path] = (name, fitted)
    return match
