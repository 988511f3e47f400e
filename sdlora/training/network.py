"""Which layers get LoRA, adding it through peft, and reading the trained LoRA back as a `LoraState`.

The layers come from `core.targets` (the UNet presets and the text encoders' projections). `--kind` picks peft's
layer type: LoRA (`LoraConfig`), DoRA (`LoraConfig(use_dora=True)`), LoHa (`LoHaConfig`) or LoKr (`LoKrConfig`).
What each writes as LyCORIS's kinds (`core.kinds`), with peft's scale against LyCORIS's (ComfyUI's, A1111's and
sdlora's own reader apply LyCORIS's):

- LoRA: peft alpha / r, LyCORIS alpha / r: alpha as configured.
- DoRA: peft W' = m * (W + alpha/r B A) / ||W + alpha/r B A|| per output row (the norm over each row of a Linear,
  over in x kh x kw of a conv); LyCORIS's `dora_scale` with `wd_on_out=True` is the same magnitude per output row,
  stored [out, 1] / [out, 1, 1, 1] (peft keeps [out] / [1, out, 1, 1]): lora_down/up/alpha as LoRA, the magnitude
  reshaped. (LyCORIS and sdlora add float32 eps to the norm, peft adds nothing: a relative 1e-7 apart.)
  ComfyUI divides such a magnitude by the norm of W alone, not of W + dW (comfy/weight_adapter/base.py
  `weight_decompose`, its output-axis branch), and A1111 (network.py `apply_weight_decompose`) reads every
  magnitude as per input column: neither applies a per-output-row DoRA exactly.
- DoRA on the input axis (`dora_axis="input"`, LyCORIS's `wd_on_output=False`): W' = (W + alpha/r B A) * m /
  ||W + alpha/r B A|| per input column (the norm over the output rows, and kh x kw of a conv), the magnitude stored
  [1, in] / [1, in, 1, 1] as LyCORIS does: exactly what ComfyUI, A1111, LyCORIS and sdlora apply. peft has no such
  layer: a plain peft LoRA layer whose input is scaled per channel by m / ||W + dW|| (`_InputDora`), since
  (W + dW) diag(d) x = (W + dW)(d * x); diffusers cannot load it (kohya file only).
- LoHa: peft (w1a @ w1b) * (w2a @ w2b) * alpha / r, LyCORIS the same with dim = r: factors and alpha as they are
  (convs flattened to [out, in * kh * kw], LyCORIS's non-Tucker layout).
- LoKr: peft kron(w1, w2) * alpha / r on every layer; LyCORIS (and ComfyUI, A1111) alpha / dim where a half is
  factored (dim = that half's rank, r), but 1 where both halves are whole (LyCORIS `lokr.py` sets alpha = dim then):
  a layer whose halves both came out whole (its rank at least half of each factor) has alpha / r folded into w1
  and its alpha written as r (LyCORIS's loader needs the key; every reader ignores it there); the others keep alpha.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from ..core.families import ModelFamily
from ..core.kinds import DoraModule, LohaModule, LokrModule
from ..core.matching import TEXT_MODEL_PREFIX, Layer, match_lora
from ..core.state import Adapter, LoraModule, LoraState
from ..core.targets import PRESETS, reaches_the_unet, unet_target_modules
from ..errors import UserError

INITS = ("gaussian", "default")
KINDS = ("lora", "loha", "lokr", "dora")  # config.KINDS: what add_lora builds (peft's layer types)
DORA_AXES = ("output", "input")  # config.DORA_AXES: the axis of DoRA's magnitude (module docstring)
INPUT_MAGNITUDE = "lora_input_magnitude"  # a peft LoRA layer's container of input-axis DoRA magnitudes (_InputDora)
TUCKER_KINDS = ("loha", "lokr")  # the kinds whose peft layers have a Tucker form of 3x3 convs (use_effective_conv2d)


@dataclass(frozen=True)
class LycorisOptions:
    """LyCORIS's own network_args for LoHa and LoKr, carried out through peft's LoHaConfig / LoKrConfig:
    - factor (LoKr): each dimension split as LyCORIS's `factorization(dim, factor)` (lycoris/functional/general.py):
      -1 the most balanced split; a factor that divides the dimension gives (factor, dim / factor), the smaller
      first; one that does not falls back to the most balanced split whose smaller part is at most the factor
      (LyCORIS's loop; no error there, none here). peft's own `factorization` leaves a dividing factor first even
      when it is the larger part (factor 16 of 64: peft (16, 4), LyCORIS (4, 16)): sdlora splits as LyCORIS.
    - decompose_both (LoKr): the first half factored too where its rank is below half its larger side.
    - use_tucker: 3x3 convs with Tucker cores (LoHa hada_t1/hada_t2, LoKr lokr_t2; peft's use_effective_conv2d).
    - rank_dropout, module_dropout, rank_dropout_scale: LyCORIS's dropouts while training (module docstring of
      `add_lora`)."""

    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of `dimension` into (m, n), m <= n, m * n = dimension (`LycorisOptions.factor`)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:  # through the divisors upwards, while m stays within the bound
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > 1 + dimension or new_m > bound:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def add_lora(
    model: nn.Module,
    target_modules: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_name: str = "default",
    init: str = "gaussian",
    generator: torch.Generator | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
    kind: str = "lora",
    module_ranks: dict[str, tuple[int, float]] | None = None,
    lycoris: LycorisOptions | None = None,
    dora_axis: str = "output",
) -> list[nn.Parameter]:
    """Add a peft LoRA adapter to `target_modules` of `model`; return its (trainable, fp32) parameters.

    Every other parameter of `model` is frozen. The LoRA parameters are fp32 even when the base is fp16/bf16, so
    the optimizer updates them at full precision (peft casts the input to the LoRA dtype in forward).
    `init`: "gaussian" (A ~ N(0, 1/r)) or "default" (A Kaiming-uniform); B starts at zero either way, so the
    model is unchanged until the first step. With `generator`, A is drawn from it instead of torch's global RNG.
    `conv_rank`/`conv_alpha` (kohya's conv_dim/conv_alpha): the rank and alpha of the 3x3 convs among the targets
    (default: `rank`, `alpha`); 1x1 convs are the linear layers they stand for and keep `rank`.
    `dtype`: the LoRA parameters' dtype; fp32 unless kohya's --full-bf16 / --full-fp16 ask for half precision.
    `kind` (module docstring): lora, dora (`init` applies to its A; the magnitude starts at the weight's row norms),
    loha or lokr (their own inits: LoHa's w2b zero, LoKr's w2 / w2b zero as LyCORIS; no input dropout).
    `module_ranks`: {layer name: (rank, alpha)} of layers at their own rank and alpha (kohya's block_dims,
    `training.blocks`), through peft's rank and alpha patterns as the convs'.
    `dora_axis` (kind dora): the magnitude per output row (peft's DoRA, LyCORIS's default) or per input column
    (`_InputDora`, what A1111 and ComfyUI apply exactly); module docstring.
    `lycoris`: LyCORIS's LoKr factor and decompose_both, Tucker 3x3 convs and its dropouts (`LycorisOptions`), for
    loha and lokr. The dropouts act as LyCORIS 4.1.3's (modules/loha.py, lokr.py) while the layer is in training
    mode: module_dropout skips the layer's whole update with probability p per forward call (a hook
    multiplying the update by 0, so that its parameters keep a zero gradient: `_LycorisModuleDropout`);
    rank_dropout (peft's) zeroes each output row of the update with probability p (one mask per call, not per sample),
    the kept rows scaled by 1 / (kept fraction) with rank_dropout_scale. peft's LoHa always scales (LyCORIS only with
    rank_dropout_scale): LoHa's rank_dropout is refused without it.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model  # peft takes a second to import
    from peft.tuners.lokr import layer as peft_lokr_layer

    if kind not in KINDS:
        raise UserError(f"unknown adapter kind {kind!r}: use one of {', '.join(KINDS)}")
    lycoris = lycoris or LycorisOptions()
    _check_lycoris(lycoris, kind)
    if dropout and kind in ("loha", "lokr"):
        raise UserError(f"LoRA dropout is on the layer input, which {kind} has not: leave it at 0")
    if dora_axis not in DORA_AXES:
        raise UserError(f"unknown DoRA axis {dora_axis!r}: use one of {', '.join(DORA_AXES)}")
    on_input = kind == "dora" and dora_axis == "input"

    if rank < 1:
        raise UserError(f"LoRA rank must be 1 or more, got {rank}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"LoRA alpha must be a positive number, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if init not in INITS:
        raise UserError(f"unknown LoRA init {init!r}: use one of {', '.join(INITS)}")
    if not target_modules:
        raise UserError("no target modules given for LoRA")
    rank_pattern, alpha_pattern = {}, {}
    if conv_rank is not None or conv_alpha is not None:
        if (conv_rank is not None and conv_rank < 1) or (conv_alpha is not None and not (math.isfinite(conv_alpha) and conv_alpha > 0)):
            raise UserError(f"conv rank must be 1 or more and conv alpha positive, got {conv_rank} and {conv_alpha}")
        layers = dict(model.named_modules())
        convs = [name for name in target_modules if isinstance(layers.get(name), nn.Conv2d) and layers[name].kernel_size != (1, 1)]
        # peft matches each pattern as a regex suffix of the module's name: the escaped full name is that layer alone
        rank_pattern = {re.escape(name): conv_rank for name in convs} if conv_rank is not None else {}
        alpha_pattern = {re.escape(name): conv_alpha for name in convs} if conv_alpha is not None else {}
    for name, (layer_rank, layer_alpha) in (module_ranks or {}).items():
        if layer_rank < 1 or not (math.isfinite(layer_alpha) and layer_alpha > 0):
            raise UserError(f"{name}: rank must be 1 or more and alpha positive, got {layer_rank} and {layer_alpha}")
        rank_pattern[re.escape(name)], alpha_pattern[re.escape(name)] = layer_rank, layer_alpha
    # without Tucker (use_effective_conv2d), convs as [out, in * kh * kw] products: LyCORIS's non-Tucker form
    dropouts = {"rank_dropout": lycoris.rank_dropout}  # module_dropout: _LycorisModuleDropout, keeping every gradient
    if kind == "loha":
        config = LoHaConfig(
            r=rank, alpha=alpha, target_modules=list(target_modules), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            use_effective_conv2d=lycoris.use_tucker, **dropouts,
        )  # fmt: skip
    elif kind == "lokr":
        config = LoKrConfig(
            r=rank, alpha=alpha, target_modules=list(target_modules), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            init_weights="lycoris", decompose_factor=lycoris.factor, decompose_both=lycoris.decompose_both,
            use_effective_conv2d=lycoris.use_tucker, rank_dropout_scale=lycoris.rank_dropout_scale, **dropouts,
        )  # fmt: skip
    else:
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules),
            init_lora_weights="gaussian" if init == "gaussian" else True,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_dora=kind == "dora" and not on_input,
        )
    # peft's LoKr layers split each dimension with peft's factorization; LyCORIS's differs (LycorisOptions.factor)
    with mock.patch.object(peft_lokr_layer, "factorization", lycoris_factorization):
        if hasattr(model, "add_adapter"):  # diffusers ModelMixin / transformers PreTrainedModel: also registers peft_config
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name)
    if on_input:
        for layer in _lora_layers(model, adapter_name).values():
            _InputDora.attach(layer, adapter_name)
    model.requires_grad_(False)
    if lycoris.module_dropout:
        for layer in _adapter_layers(model, adapter_name).values():
            _LycorisModuleDropout(lycoris.module_dropout).attach(layer)
    params = lora_parameters(model, adapter_name)
    for param in params:
        # fp32 master weights under mixed precision (what diffusers' cast_training_params does), unless asked otherwise
        param.data = param.data.to(dtype)
        param.requires_grad_(True)
    if generator is not None:
        if kind in ("loha", "lokr"):
            raise UserError(f"a LoRA init generator redraws lora_A, which {kind} has not")
        _init_from_generator(model, adapter_name, init, generator)
    return params


class _LycorisModuleDropout:
    """LyCORIS's module_dropout on a peft LoHa/LoKr layer: in training mode, with probability p (one torch.rand(1) per
    call, as LyCORIS's and peft's `forward`) the layer's output is its base layer's. peft's own module_dropout skips
    the update, which leaves its parameters without a gradient, which DDP refuses; here the update is multiplied by 0,
    the same output with a zero gradient (as `add_kohya_dropout`). Two forward hooks: the base layer's output kept,
    the layer's replaced."""

    def __init__(self, probability: float):
        self.probability = probability
        self.base_output: torch.Tensor | None = None

    def attach(self, layer: nn.Module) -> None:
        layer.get_base_layer().register_forward_hook(self._keep)
        layer.register_forward_hook(self._drop)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.base_output = output

    def _drop(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        base, self.base_output = self.base_output, None
        if not module.training or base is None or not torch.rand(1) < self.probability:
            return output
        return (base + (output - base) * 0.0).to(output.dtype)


class _InputDora:
    """DoRA with its magnitude per input column on a peft LoRA layer (module docstring): a forward pre-hook scaling the
    layer's input per channel by m / (||W + dW|| + eps), the norm per input column of the merged weight (over the
    output rows and a conv's kh x kw), taken in fp32 and, as peft's DoRA does (the DoRA paper's section 4.3), without
    a gradient through it. eps is float32's, as LyCORIS and sdlora's merge add. m starts at the base weight's column
    norms (the layer is unchanged at step 0) and is `INPUT_MAGNITUDE`[adapter], registered among the layer's
    adapter containers, so that peft, `lora_parameters` and checkpoints treat it as its other weights."""

    def __init__(self, adapter_name: str):
        self.adapter_name = adapter_name

    @classmethod
    def attach(cls, layer: nn.Module, adapter_name: str) -> None:
        if not hasattr(layer, INPUT_MAGNITUDE):
            setattr(layer, INPUT_MAGNITUDE, nn.ParameterDict())
            layer.adapter_layer_names = (*layer.adapter_layer_names, INPUT_MAGNITUDE)
        weight = layer.get_base_layer().weight.detach().float()
        getattr(layer, INPUT_MAGNITUDE)[adapter_name] = nn.Parameter(_column_norms(weight))
        layer.register_forward_pre_hook(cls(adapter_name))

    def __call__(self, layer: nn.Module, args: tuple) -> tuple | None:
        if layer.disable_adapters or layer.merged or self.adapter_name not in layer.active_adapters:
            return None
        x = args[0]
        scale = input_dora_scale(layer, self.adapter_name)
        shape = [1] * x.dim()
        shape[1 if isinstance(layer.get_base_layer(), nn.Conv2d) else -1] = -1
        return (x * scale.view(shape).to(x.dtype), *args[1:])


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a [out, in] or [out, in, kh, kw] weight: over the other axes, [in]."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1)


def input_dora_scale(layer: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """The per-input-channel factor m / (||W + dW|| + eps) of an input-axis DoRA layer ([in], fp32; `_InputDora`):
    the layer's effective weight is (W + dW) times it along the input axis."""
    with torch.no_grad():
        base = layer.get_base_layer().weight.float()
        down, up = layer.lora_A[adapter_name].weight.float(), layer.lora_B[adapter_name].weight.float()
        merged = base + _update(down, up).reshape(base.shape) * layer.scaling[adapter_name]
        norms = _column_norms(merged) + torch.finfo(torch.float32).eps
    return getattr(layer, INPUT_MAGNITUDE)[adapter_name].float() / norms


def _check_lycoris(options: LycorisOptions, kind: str) -> None:
    """One line for a LyCORIS option `kind` cannot carry out (training.config checks the same on the options)."""
    if (options.factor != -1 or options.decompose_both) and kind != "lokr":
        raise UserError(f"LoKr's factor and decompose_both split LoKr's halves; --kind {kind} has none: use --kind lokr")
    if options.factor == 0 or options.factor < -1:
        raise UserError(f"LoKr factor must be -1 (the most balanced split) or 1 or more, got {options.factor}")
    if options.use_tucker and kind not in TUCKER_KINDS:
        raise UserError(
            f"Tucker convs (use_tucker) are LoHa's and LoKr's here; peft's --kind {kind} has no Tucker form: use --kind loha or lokr"
        )
    if (options.rank_dropout or options.module_dropout) and kind not in TUCKER_KINDS:
        raise UserError(f"LyCORIS's rank and module dropouts are LoHa's and LoKr's; --kind {kind} takes kohya's (add_kohya_dropout)")
    for name in ("rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(options, name) < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {getattr(options, name)}")
    if kind == "loha" and options.rank_dropout and not options.rank_dropout_scale:
        raise UserError(
            "LoHa's rank_dropout: peft scales the kept rows by 1 / (kept fraction), LyCORIS only with rank_dropout_scale: "
            "add --rank-dropout-scale"
        )


@torch.no_grad()
def _init_from_generator(model: nn.Module, adapter_name: str, init: str, generator: torch.Generator) -> None:
    """Redraw every lora_A from `generator` with peft's distribution for `init`; B stays zero."""
    for layer in _lora_layers(model, adapter_name).values():
        weight = layer.lora_A[adapter_name].weight
        # drawn on the generator's device, so a CPU generator gives the same values whatever device the model is on
        values = torch.empty(weight.shape, dtype=torch.float32, device=generator.device)
        if init == "gaussian":
            nn.init.normal_(values, std=1.0 / layer.r[adapter_name], generator=generator)
        else:
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        weight.copy_(values)


@torch.no_grad()
def load_state_into(
    state: LoraState,
    models: dict[str, nn.Module],
    adapter_name: str = "default",
    label: str = "the LoRA",
    family: ModelFamily | None = None,
) -> int:
    """Copy `state` into the adapter `adapter_name` already added to `models` ({component: model}); return the count.

    The file and the adapter must cover the same layers with the same rank each; a different alpha is absorbed
    into `up`, so the update (alpha / r) * up @ down is the file's exactly. Raises a one-line ValueError naming
    `label` and what to change otherwise. With `family`, the file's modules on text-encoder layers the UNet never
    reads (which training leaves out: SDXL's first encoder's last layer) are dropped, as they changed nothing.
    """
    if family is not None:
        state = LoraState(
            {path: module for path, module in state.modules.items() if _reaches_the_unet(path, models, family)}, state.metadata
        )
    other = next((path for path, module in state.modules.items() if not isinstance(module, LoraModule)), None)
    if other is not None:
        raise UserError(
            f"{label} holds a {state.modules[other].kind} module ({other}); training goes on from a plain LoRA only: convert it with --rank first"
        )
    adapted = {component: _lora_layers(model, adapter_name) for component, model in models.items()}
    layers = {c: {name: Layer(tuple(layer.get_base_layer().weight.shape)) for name, layer in found.items()} for c, found in adapted.items()}
    match = match_lora(state, layers, label, "the model being trained")
    hint = _layer_set_hint(state, models)
    if match.unmatched:
        raise UserError(f"{label} adapts {len(match.unmatched)} layers this run does not (first: {match.unmatched[0]}){hint}")
    hit = {(path.partition(".")[0], name) for path, (name, _) in match.modules.items()}
    missing = sorted(f"{c}.{_canonical(c, name)}" for c, found in adapted.items() for name in found if (c, name) not in hit)
    if missing:
        total = sum(len(found) for found in adapted.values())
        raise UserError(f"{label} lacks {len(missing)} of the {total} layers this run adapts (first: {missing[0]}){hint}")
    for path, (name, module) in match.modules.items():
        if not isinstance(module, LoraModule):  # refused above: this narrows the type
            raise RuntimeError(f"{path} is no LoRA module")
        layer = adapted[path.partition(".")[0]][name]
        down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if module.rank != layer.r[adapter_name]:
            raise UserError(f"{label} has rank {module.rank} at {path}, this run rank {layer.r[adapter_name]}: set --rank {module.rank}")
        down.copy_(module.down.reshape(down.shape).to(down.dtype))
        up.copy_((module.up.to(torch.float32) * (module.scale / layer.scaling[adapter_name])).reshape(up.shape).to(up.dtype))
    return len(match.modules)


def _reaches_the_unet(path: str, models: dict[str, nn.Module], family: ModelFamily) -> bool:
    component, _, name = path.partition(".")
    if not component.startswith("text_encoder") or component not in models:
        return True
    return reaches_the_unet(name, models[component], family.text_encoder(component))


def _canonical(component: str, name: str) -> str:
    """A layer name as LoraState spells it: text encoders with `text_model.` whatever the installed tree says."""
    return name if not component.startswith("text_encoder") else TEXT_MODEL_PREFIX + name.removeprefix(TEXT_MODEL_PREFIX)


def _layer_set_hint(state: LoraState, models: dict[str, nn.Module]) -> str:
    """What to change so that this run adapts the layers `state` holds: the preset, or --train-text-encoder."""
    has_text = any(path.startswith("text_encoder") for path in state.modules)
    text_encoder_adapted = any(component.startswith("text_encoder") for component in models)
    if has_text != text_encoder_adapted:
        return ": add --train-text-encoder" if has_text else ": it has no text-encoder layers, drop --train-text-encoder"
    denoiser = next(component for component in models if not component.startswith("text_encoder"))
    in_file = {path.removeprefix(denoiser + ".") for path in state.modules if path.startswith(denoiser + ".")}
    for preset in PRESETS:
        try:
            if set(unet_target_modules(models[denoiser], preset)) == in_file:
                return f": it was trained with --preset {preset}"
        except ValueError:
            continue
    return ": no --preset adapts exactly its layers"


def _lora_layers(model: nn.Module, adapter_name: str | None) -> dict[str, nn.Module]:
    """peft LoRA layers by module name, those holding `adapter_name` (any adapter when None)."""
    from peft.tuners.lora import LoraLayer  # peft takes a second to import: only when training

    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if adapter_name is None:
        return {name: layer for name, layer in layers.items() if len(layer.lora_A) > 0}
    return {name: layer for name, layer in layers.items() if adapter_name in layer.lora_A}


def _adapter_layers(model: nn.Module, adapter_name: str | None) -> dict[str, nn.Module]:
    """peft adapter layers of any kind trained here (LoRA/DoRA, LoHa, LoKr) holding `adapter_name` (any when None)."""
    from peft.tuners.loha import LoHaLayer  # peft takes a second to import: only when training
    from peft.tuners.lokr import LoKrLayer

    layers = _lora_layers(model, adapter_name)
    for name, module in model.named_modules():
        if isinstance(module, LoHaLayer | LoKrLayer):
            held = module._available_adapters
            if held if adapter_name is None else adapter_name in held:
                layers[name] = module
    return layers


def _layer_parameters(layer: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """`adapter_name`'s parameters in `layer`, from peft's own list of its adapter containers (`adapter_layer_names`:
    lora_A/lora_B/lora_magnitude_vector, hada_*, lokr_*)."""
    params: list[nn.Parameter] = []
    for attribute in layer.adapter_layer_names:
        container = getattr(layer, attribute)
        if adapter_name in container:
            entry = container[adapter_name]
            params.extend([entry] if isinstance(entry, nn.Parameter) else entry.parameters())
    return params


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters of `model` (lora_A/lora_B and DoRA's magnitude, LoHa's hada_*, LoKr's lokr_*), of one
    adapter, or all adapters when `adapter_name` is None."""
    params: list[nn.Parameter] = []
    for layer in _adapter_layers(model, adapter_name).values():
        names = adapter_name and [adapter_name]
        if not names:
            names = list(layer.lora_A) if hasattr(layer, "lora_A") else sorted(layer._available_adapters)
        for name in names:
            params.extend(_layer_parameters(layer, name))
    unique = {id(param): param for param in params}  # a parameter peft lists under two containers is trained once
    return list(unique.values())


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32, copy=True)


def _to_adapter(layer: nn.Module, name: str, adapter_name: str) -> Adapter:
    """One trained peft layer as the `core` kind the kohya file holds it as, at the scale LyCORIS applies (module
    docstring): LoRA, DoRA over LoRA, LoHa or LoKr."""
    from peft.tuners.loha import LoHaLayer  # peft takes a second to import: only when training
    from peft.tuners.lokr import LoKrLayer

    if isinstance(layer, LoHaLayer):
        names = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b", "t1": "hada_t1", "t2": "hada_t2"}
        factors = {
            key: _cpu(getattr(layer, attribute)[adapter_name])
            for key, attribute in names.items()
            if adapter_name in getattr(layer, attribute)
        }
        return LohaModule(alpha=_alpha(layer, adapter_name), **factors)
    if isinstance(layer, LoKrLayer):
        factors = {
            key: _cpu(getattr(layer, attribute)[adapter_name])
            for key, attribute in (
                ("w1", "lokr_w1"),
                ("w1a", "lokr_w1_a"),
                ("w1b", "lokr_w1_b"),
                ("w2", "lokr_w2"),
                ("w2a", "lokr_w2_a"),
                ("w2b", "lokr_w2_b"),
                ("t2", "lokr_t2"),
            )  # fmt: skip
            if adapter_name in getattr(layer, attribute)
        }
        if "w1" in factors and "w2" in factors:  # LyCORIS's scale is 1 here: peft's alpha / r goes into w1
            factors["w1"] = factors["w1"] * layer.scaling[adapter_name]
            return LokrModule(alpha=float(layer.r[adapter_name]), **factors)  # alpha there for LyCORIS's loader, unused
        return LokrModule(alpha=_alpha(layer, adapter_name), **factors)
    lora = _to_lora_module(layer, name, adapter_name)
    if adapter_name in getattr(layer, INPUT_MAGNITUDE, {}):  # LyCORIS's [1, in] / [1, in, 1, 1]
        magnitude = _cpu(getattr(layer, INPUT_MAGNITUDE)[adapter_name])
        return DoraModule(lora, magnitude.reshape(1, -1, *[1] * (lora.down.ndim - 2)), on_output=False)
    if not layer.use_dora.get(adapter_name, False):
        return lora
    magnitude = _cpu(layer.lora_magnitude_vector[adapter_name].weight)
    return DoraModule(lora, magnitude.reshape(lora.up.shape[0], *[1] * (lora.down.ndim - 1)), on_output=True)


def _alpha(layer: nn.Module, adapter_name: str) -> float:
    """alpha in LyCORIS's sense (scale * r) of a peft LoHa/LoKr layer: its configured alpha where that is exact."""
    rank = layer.r[adapter_name]
    alpha = layer.scaling[adapter_name] * rank
    configured = float(layer.alpha[adapter_name])
    return configured if math.isclose(alpha, configured, rel_tol=1e-9) else alpha


def _to_lora_module(layer: nn.Module, name: str, adapter_name: str) -> LoraModule:
    # getattr: layers of older peft versions have no lora_bias at all
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        raise UserError(f"LoRA layer {name} uses a LoRA bias, which LoRA files cannot hold")
    rank = layer.r[adapter_name]
    # scaling is alpha / r (alpha / sqrt(r) with rsLoRA, times any set_adapters weight): alpha in our sense is scaling * r
    alpha = layer.scaling[adapter_name] * rank
    configured = float(layer.lora_alpha[adapter_name])
    if math.isclose(alpha, configured, rel_tol=1e-9):
        alpha = configured  # the exact configured value, not one rounded through alpha / r * r
    return LoraModule(_cpu(layer.lora_A[adapter_name].weight), _cpu(layer.lora_B[adapter_name].weight), alpha)


def extract_lora_state(models: dict[str, nn.Module], adapter_name: str = "default") -> LoraState:
    """The adapter `adapter_name` of `models` ({component: model}) as a `LoraState`: fp32 CPU copies, alpha per module.

    Paths are `unet.<module>` and `text_encoder.text_model.<module>`: text encoders always with `text_model.`,
    also under transformers 5 whose CLIPTextModel tree drops that level.
    """
    modules: dict[str, Adapter] = {}
    for component, model in models.items():
        for name, layer in _adapter_layers(model, adapter_name).items():
            modules[f"{component}.{_canonical(component, name)}"] = _to_adapter(layer, name, adapter_name)
    if not modules:
        raise UserError(f"the model has no LoRA adapter named {adapter_name!r}")
    return LoraState(modules)


# ---------------------------------------------------------------- kohya's network options on peft's LoRA layers


def add_kohya_dropout(
    model: nn.Module, network_dropout: float, rank_dropout: float, module_dropout: float, adapter_name: str = "default"
) -> int:
    """kohya's three dropouts on every LoRA layer of `model`, while training only (`set_adapter_training`); returns
    the count of layers. They act on the down projection's output lx = A x, as sd-scripts networks/lora.py
    `LoRAModule.forward` does (peft's `lora_dropout`, sdlora's --dropout, is on the input x instead):
    - network_dropout: F.dropout(lx, p) (scaled by 1/(1-p), as F.dropout does);
    - rank_dropout: each rank of each sample kept with probability 1-p (a mask [batch, r]) and the update scaled by
      1/(1-p) (kohya scales `scale`; B is linear, so the same);
    - module_dropout: with probability p (one torch.rand(1) per call) the layer adds no LoRA. kohya returns the base
      output; here lx is multiplied by 0, the same output, so that every LoRA parameter still gets a (zero) gradient,
      which DDP needs.
    A forward hook on peft's lora_A module, so the parameters and their names stay peft's."""
    if not (network_dropout or rank_dropout or module_dropout):
        return 0
    layers = _lora_layers(model, adapter_name)
    for layer in layers.values():
        if layer.use_dora.get(adapter_name, False) or hasattr(layer, INPUT_MAGNITUDE):  # DoRA's norm is of B A, undropped
            raise UserError("kohya's dropouts with DoRA would change the norm DoRA divides by: train them with --kind lora")
        layer.lora_A[adapter_name].register_forward_hook(_KohyaDropout(network_dropout, rank_dropout, module_dropout))
    return len(layers)


class _KohyaDropout:
    """The forward hook of `add_kohya_dropout` (a class, so that it pickles and says what it holds)."""

    def __init__(self, network_dropout: float, rank_dropout: float, module_dropout: float):
        self.network_dropout, self.rank_dropout, self.module_dropout = network_dropout, rank_dropout, module_dropout

    def __call__(self, module: nn.Module, inputs: tuple, lx: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return lx
        if self.module_dropout and torch.rand(1) < self.module_dropout:
            return lx * 0.0
        if self.network_dropout:
            lx = torch.nn.functional.dropout(lx, p=self.network_dropout)
        if self.rank_dropout:
            rank = module.weight.shape[0]
            mask = torch.rand((lx.size(0), rank), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # [batch, tokens, r]: Linear layers on token sequences
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # [batch, r, h, w]: convs
                mask = mask[:, :, None, None]
            lx = lx * mask.to(lx.dtype) / (1.0 - self.rank_dropout)
        return lx


def set_adapter_training(model: nn.Module, training: bool) -> None:
    """Put the adapter layers of `model` (peft's, with their dropouts) in training or evaluation mode; the frozen base
    keeps its own mode (diffusers and transformers load models in evaluation mode, which also leaves the text
    encoders' gradient checkpointing as it was)."""
    for layer in _adapter_layers(model, None).values():
        layer.train(training)  # its base layer too: a Linear or Conv2d, the same in either mode


@torch.no_grad()
def apply_max_norm(models: dict[str, nn.Module], max_norm: float, adapter_name: str = "default") -> tuple[int, float, float]:
    """kohya's scale_weight_norms (sd-scripts networks/lora.py `apply_max_norm_regularization`), on every LoRA layer:
    the update W = (alpha / r) B A (a 3x3 conv's as the conv of A by B) has its Frobenius norm n; where n > max_norm,
    A and B are both multiplied by sqrt(max_norm / n), so the update's norm becomes max_norm. Returns (the number of
    layers scaled, the mean and the max of the norms after scaling), which kohya logs as keys_scaled,
    avg_key_norm and max_key_norm."""
    scaled, norms = 0, []
    for model in models.values():
        for layer in _lora_layers(model, adapter_name).values():
            down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            norm = float(_update(down.float(), up.float()).norm()) * layer.scaling[adapter_name]
            if norm > max_norm:
                ratio = max_norm / norm
                down.mul_(ratio**0.5)
                up.mul_(ratio**0.5)
                scaled += 1
                norm *= ratio
            norms.append(norm)
    if not norms:
        raise UserError("--scale-weight-norms: the model has no LoRA layers")
    return scaled, sum(norms) / len(norms), max(norms)


def _update(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """B A of a Linear ([out, in]), a 1x1 conv or a 3x3 conv ([out, in, kh, kw]), without the scale."""
    if down.dim() == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def parameter_groups(
    model: nn.Module, lr: float, loraplus_ratio: float | None = None, lr_weight=None, adapter_name: str = "default"
) -> list[dict]:
    """The optimizer's parameter groups of one component's adapter, as kohya's prepare_optimizer_params builds them
    (sd-scripts networks/lora.py): with `lr_weight` (a layer name -> its block's factor: the UNet under block
    learning-rate weights) one group per factor at lr x factor; with `loraplus_ratio` (LoRA+), each split into the
    down projections and DoRA's magnitudes at that rate and the up projections (lora_B, kohya's lora_up) at rate x
    ratio. Groups at rate 0 are left out, as kohya does."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # a parameter peft lists under two containers is trained once (as lora_parameters)
    for name, layer in _adapter_layers(model, adapter_name).items():
        weight = 1.0 if lr_weight is None else lr_weight(name)
        up = {id(layer.lora_B[adapter_name].weight)} if loraplus_ratio and hasattr(layer, "lora_B") else set()
        for param in _layer_parameters(layer, adapter_name):
            if id(param) not in seen:
                seen.add(id(param))
                groups.setdefault((weight, id(param) in up), []).append(param)
    result = []
    for (weight, is_up), params in groups.items():
        rate = lr * weight * (loraplus_ratio if is_up else 1.0)
        if rate:
            result.append({"params": params, "lr": rate})
    return result
