"""A LoRA from a fine-tuned model: the SVD of (tuned - base) per layer, as kohya's extract_lora_from_models.py.

The layers are the UNet's `attn-ff` preset (attention, feed-forward, proj_in/out), or its `all` preset with
`conv_rank` (resnets and down/upsamplers too, 3x3 convs at `conv_rank`), and every text encoder's attention and MLP
projections. A text encoder whose weights differ by at most `min_diff` anywhere counts as not fine-tuned and is
left out (kohya's --min_diff); the factors are clamped at `clamp_quantile` of their magnitudes (kohya's
--clamp_quantile) unless it is 1.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.families import family_of_pipeline
from ..core.formats.names import canonical_path
from ..core.lowrank import Report, factor
from ..core.matching import base_layers
from ..core.state import Adapter, LoraState
from ..core.targets import TEXT_ENCODER_MLP, TEXT_ENCODER_TARGETS, text_encoder_target_modules, unet_target_modules
from ..errors import UserError
from ..inference.adapters import describe_pipeline
from ..models.loading import load_pipeline


def extract_lora(
    base: str,
    tuned: str,
    rank: int,
    *,
    conv_rank: int | None = None,
    clamp_quantile: float = 0.99,
    min_diff: float = 0.01,
    config: str | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[LoraState, Report, object]:
    """(the LoRA that takes `base` towards `tuned`, its report, the models' family). Both models load in `dtype`
    (fp32 by default, as kohya's: a half-precision load rounds away small differences)."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError("--rank and --conv-rank must be at least 1")
    if not 0 < clamp_quantile <= 1:
        raise UserError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile:g}")
    pipes = [load_pipeline(model, dtype=dtype, config=config, allow_pickle=allow_pickle) for model in (base, tuned)]
    family, other = (family_of_pipeline(pipe) for pipe in pipes)
    described = [describe_pipeline(pipe) for pipe in pipes]
    if other != family or described[0] != described[1]:
        raise UserError(
            f"the base model is {family.label} ({described[0]}) but the fine-tuned one is {other.label} ({described[1]}): "
            "extract takes two models of one architecture"
        )
    if family.denoiser != "unet":
        raise UserError(f"extract takes SD1, SD2 and SDXL models; {base} is an {family.label} model, which it cannot read yet")
    plan: list[tuple[str, str]] = [("unet", name) for name in unet_target_modules(pipes[0].unet, "all" if conv_rank else "attn-ff")]
    for spec in family.text_encoders:
        encoder = getattr(pipes[0], spec.component)
        plan += [(spec.component, name) for name in text_encoder_target_modules(encoder, TEXT_ENCODER_TARGETS + TEXT_ENCODER_MLP)]
    layers = {component: (base_layers(getattr(pipes[0], component)), base_layers(getattr(pipes[1], component))) for component, _ in plan}
    report = Report({}, [])
    skipped = _unchanged_text_encoders(plan, layers, min_diff, report)
    modules: dict[str, Adapter] = {}
    unchanged = 0
    for component, name in tqdm(
        [p for p in plan if p[0] not in skipped], desc="extracting", unit="layer", disable=None
    ):  # None: no bar off a terminal
        before, after = (side[name].weight.detach() for side in layers[component])
        if before.shape != after.shape:
            raise UserError(f"{component}.{name} is {list(before.shape)} in the base model but {list(after.shape)} in the fine-tuned one")
        delta = after.to(torch.float32) - before.to(torch.float32)
        if not bool(delta.any()):
            unchanged += 1
            continue
        conv = delta.ndim == 4 and any(size > 1 for size in delta.shape[2:])
        entry = factor(delta, conv_rank if conv else rank, clamp_quantile=clamp_quantile)
        path = f"{component}.{canonical_path(component, name, name)}"
        report.modules[path] = entry
        modules[path] = entry.module
    if unchanged:
        report.notes.append(f"{unchanged} layers are the same in both models: left out")
    if not modules:
        raise UserError(f"{tuned} does not differ from {base} in any layer a LoRA covers: nothing to extract")
    return LoraState(modules, {}), report, family


def _unchanged_text_encoders(plan, layers, min_diff: float, report: Report) -> set[str]:
    """The text encoders whose largest weight difference is at most `min_diff` (kohya: not fine-tuned)."""
    skipped = set()
    for component in dict.fromkeys(c for c, _ in plan if c != "unet"):
        before, after = layers[component]
        largest = max(
            float((after[name].weight.detach().float() - before[name].weight.detach().float()).abs().max())
            for c, name in plan
            if c == component
        )
        if largest <= min_diff:
            skipped.add(component)
            report.notes.append(f"{component}: unchanged (largest difference {largest:.3g} <= --min-diff {min_diff:g}): left out")
    return skipped
