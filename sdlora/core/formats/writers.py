"""Turn a `LoraState` into the tensors and headers of the formats sdlora writes (diffusers, kohya)."""

from __future__ import annotations

import json

import torch

from ...errors import UserError
from ..families import ModelFamily
from ..kinds import KIND_NAMES, DoraModule
from ..state import Adapter, LoraModule, LoraState
from .ldm import ldm_table_of, ldm_unet_key
from .mmdit import to_mmdit
from .names import DIFFUSERS, KIND_KEYS, KOHYA_ALPHA, KOHYA_UNET_PREFIX, METADATA_KEY, PEFT_MAGNITUDE, SHARED_KEYS, SUFFIXES, kohya_name


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
        "use_dora": any(isinstance(m, DoraModule) for m in modules.values()),
        "lora_bias": False,
    }


def to_diffusers_layers(state: LoraState) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """{component: (peft state dict without the component prefix, LoraConfig kwargs)} for save_lora_weights.

    Plain LoRA, and DoRA over LoRA with its magnitude per output row (peft's `use_dora`, which diffusers loads): the
    magnitude as peft keeps it, `lora_magnitude_vector` [out] for a Linear, [1, out, 1, 1] for a conv. peft's
    use_dora is per component, so a component holds DoRA on every module or on none."""
    down_suffix, up_suffix = SUFFIXES[DIFFUSERS]
    loras: dict[str, LoraModule] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for path, module in state.modules.items():
        if isinstance(module, DoraModule) and isinstance(module.inner, LoraModule) and module.on_output:
            loras[path] = module.inner
            out = module.inner.up.shape[0]
            magnitudes[path] = module.magnitude.reshape(out) if module.inner.down.ndim == 2 else module.magnitude.reshape(1, out, 1, 1)
        elif isinstance(module, LoraModule):
            loras[path] = module
        else:
            kind = KIND_NAMES[module.kind] + (f" over {KIND_NAMES[module.inner.kind]}" if isinstance(module, DoraModule) else "")
            raise UserError(
                f"the diffusers format holds plain LoRA and peft's DoRA, and {path} is {kind}: write it as kohya, or convert it to a LoRA with --rank"
            )
    layers = {}
    for component in state.components():
        tensors = {}
        prefix = component + "."
        paths = [path for path in loras if path.startswith(prefix)]
        if 0 < sum(path in magnitudes for path in paths) < len(paths):
            raise UserError(
                f"the diffusers format takes DoRA on all of a component's modules or none, and {component} mixes DoRA and LoRA: write it as kohya"
            )
        for path in paths:
            module = loras[path]
            tensors[path[len(prefix) :] + down_suffix] = module.down.contiguous()
            tensors[path[len(prefix) :] + up_suffix] = module.up.contiguous()
            if path in magnitudes:  # diffusers' text-encoder loader keeps the name as it is: there with `.weight`
                suffix = PEFT_MAGNITUDE[1] if component == "unet" else PEFT_MAGNITUDE[0]
                tensors[path[len(prefix) :] + "." + suffix] = magnitudes[path].contiguous()
        layers[component] = (tensors, lora_config_kwargs(state, component))
    return layers


def to_diffusers(state: LoraState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers file's tensors and header, exactly as `save_lora_weights` writes them."""
    tensors, flat_config = {}, {}
    for component, (layers, config) in to_diffusers_layers(state).items():
        tensors.update({f"{component}.{key}": value for key, value in layers.items()})
        flat_config.update({f"{component}.{key}": value for key, value in config.items()})
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(flat_config, indent=2, sort_keys=True)}


def kohya_prefixes(family: ModelFamily) -> dict[str, str]:
    """component -> kohya key prefix for a family: lora_unet_ for its denoiser, and lora_te_ or lora_te1_/lora_te2_
    (/lora_te3_)."""
    return {family.denoiser: KOHYA_UNET_PREFIX} | {spec.component: spec.kohya_prefix for spec in family.text_encoders}


def kohya_module_name(component: str, module_path: str, family: ModelFamily, label: str) -> str:
    """A module's kohya name without its prefix: the diffusers path underscored, or for families whose kohya code
    names the UNet in LDM terms (SDXL: kohya's sd-scripts load network weights non-strictly, so other names are
    silently ignored there) the LDM path underscored: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`."""
    if component == "unet" and family.kohya_unet_names == "ldm":
        try:
            ldm_path = ldm_unet_key(module_path + ".weight", ldm_table_of(family)).removesuffix(".weight")
        except ValueError as err:
            raise UserError(f"LoRA module {label} has no LDM name in {family.label}'s UNet, which kohya files need") from err
        return ldm_path.replace(".", "_")
    return kohya_name(module_path, label)


def _kohya_modules(state: LoraState, family: ModelFamily) -> dict[tuple[str, str], Adapter]:
    """{(component, path as kohya names it before underscoring): module}: SD3's transformer in SAI's MMDiT names
    with q/k/v fused (kohya's SD3 files), every other module under its own path."""
    prefixes = kohya_prefixes(family)
    for path in state.modules:
        component = path.partition(".")[0]
        if component not in prefixes:
            raise UserError(f"LoRA module {path} is for {component}, which {family.label} models do not have")
    if family.kohya_unet_names != "mmdit":
        return {tuple(path.split(".", 1)): module for path, module in state.modules.items()}
    modules = {(family.denoiser, path): module for path, module in to_mmdit(state.for_component(family.denoiser)).items()}
    return modules | {tuple(path.split(".", 1)): m for path, m in state.modules.items() if not path.startswith(family.denoiser + ".")}


def to_kohya(state: LoraState, family: ModelFamily) -> dict[str, torch.Tensor]:
    """kohya/A1111/ComfyUI tensors, named as `family`'s kohya files are: per module its kind's tensors (LoRA's
    lora_down/lora_up, LyCORIS's hada_*/lokr_*/diff, DoRA's dora_scale) and an `.alpha` where the kind has one."""
    prefixes = kohya_prefixes(family)
    tensors = {}
    for (component, module_path), module in _kohya_modules(state, family).items():
        path = f"{component}.{module_path}"
        key = prefixes[component] + kohya_module_name(component, module_path, family, path)
        inner = module.inner if isinstance(module, DoraModule) else module
        names = {field: suffix for suffix, field in KIND_KEYS[inner.kind].items()} | {
            field: suffix for suffix, field in SHARED_KEYS.items()
        }
        for field, tensor in module.factors().items():
            tensors[f"{key}.{names[field]}"] = tensor.contiguous()
        # LoKr with both halves whole has scale 1 and no effective alpha, but keeps the alpha it was given: LyCORIS's
        # loader needs the key (every reader ignores its value there)
        alpha = module.effective_alpha if module.effective_alpha is not None else module.alpha
        if alpha is not None:
            tensors[key + KOHYA_ALPHA] = torch.tensor(alpha, dtype=torch.float32)
    return tensors
