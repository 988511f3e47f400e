"""Merge LoRAs into model weights: W' = W + scale * (alpha / r) * up @ down, for Linear, 1x1 and 3x3 conv weights.

`merge_model` streams a diffusers folder (or a single-file checkpoint) tensor by tensor: each adapted weight is read,
updated in fp32 and written, every other tensor is copied byte for byte, so peak memory stays near one tensor plus
the LoRAs. `merge_lora` does the same arithmetic on a pipeline in memory. Unmerging is merging with negated scales:
W' - scale * delta gives W back to float rounding.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..core.families import (
    ModelFamily,
    check_single_file_parts,
    denoiser_text_width,
    describe_model,
    family_of_folder,
    family_of_pipeline,
    family_of_single_file,
    lora_architecture,
)
from ..core.files import read_lora
from ..core.formats.ldm import ldm_unet_table_from_keys
from ..core.formats.single_file import WeightSlot, single_file_slot
from ..core.kinds import KIND_NAMES
from ..core.matching import Layer, LayerLookup, base_layers, check_components, match_lora
from ..core.state import COMPONENTS, Adapter, LoraState
from ..core.version import __version__
from ..errors import UserError
from ..models import loading as models
from ..storage import output_rules
from ..storage.atomic import atomic_dir, atomic_file
from ..storage.safetensors_stream import DTYPE_NAMES, FLOAT_DTYPES, TORCH_DTYPES, Header, TensorInfo, read_header, rewrite
from .adapters import describe_pipeline, pipeline_layers
from .prompts import check_lora_weight

LoraSpec = tuple[LoraState | str | os.PathLike, float]


class _Update(NamedTuple):
    """One LoRA module's update of a stored weight: the module, its scale, and where in the stored tensor it lands."""

    label: str  # the module's LoraState path: names the culprit in errors
    module: Adapter
    scale: float
    target: WeightSlot


BIAS_LABEL = " (bias)"  # a full diff's bias update is labelled after its module, with this ending
# weight key -> the updates one stored weight receives
Plan = dict[str, list[_Update]]
PICKLE_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth")
_SHARD = re.compile(r"-\d+-of-\d+(?=\.safetensors$)")


class _Lora(NamedTuple):
    label: str  # the file, or "LoRA #n" for an in-memory state: names the culprit in errors
    state: LoraState
    scale: float


@dataclass
class MergeStats:
    """What a merge did: counts, and the bytes and seconds of the update arithmetic alone (file I/O excluded)."""

    modules: int = 0  # LoRA modules merged, over all LoRAs
    tensors: int = 0  # weight tensors changed
    bytes_touched: int = 0  # weight bytes read and written plus LoRA bytes read by the arithmetic
    arithmetic_s: float = 0.0


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (file, scale); the last ':' separates a scale only if what follows parses as a number."""
    path, sep, tail = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0
    return path, check_lora_weight(scale, f"--lora {text}")


def negate(loras: Sequence[LoraSpec]) -> list[LoraSpec]:
    """The same LoRAs with opposite scales: merging them undoes a merge."""
    return [(source, -float(scale)) for source, scale in loras]


def merge_lora(pipe, loras: Sequence[LoraSpec], allow_pickle: bool = False, stats: MergeStats | None = None) -> int:
    """Merge LoRAs into a pipeline in memory (UNet, text encoders); returns the number of LoRA modules merged.

    Nothing changes if any module fails to match, does not fit, or would give NaN/inf."""
    return _merge_pipeline(pipe, _load_loras(loras, allow_pickle), stats if stats is not None else MergeStats())


def _merge_pipeline(pipe, loaded: list[_Lora], stats: MergeStats) -> int:
    family = family_of_pipeline(pipe)
    layers = pipeline_layers(pipe, family)
    # by the plan's keys; a peft-wrapped layer stands for its base layer, whose weight (and bias) is the one to update
    weights = {
        f"{component}.{name}.{param}": getattr(layer, param)
        for component in layers
        for name, layer in base_layers(getattr(pipe, component)).items()
        for param in ("weight", "bias")
        if isinstance(getattr(layer, param, None), torch.Tensor)
    }

    def locate(component: str, name: str, param: str = "weight") -> WeightSlot | None:
        key = f"{component}.{name}.{param}"
        return WeightSlot(key) if key in weights else None

    plan = _plan(loaded, family, layers, "the pipeline", describe_pipeline(pipe), locate)
    with torch.no_grad():
        for key, updates in plan.items():  # first pass only checks, so a refusal leaves the pipeline as it was
            _merged(weights[key].detach().clone(), updates, weights[key].dtype, key, MergeStats())
        for key, updates in plan.items():
            weights[key].copy_(_merged(weights[key].detach().clone(), updates, weights[key].dtype, key, stats))
    count = _module_count(plan)
    stats.modules += count
    return count


def merge_model(
    model: str | os.PathLike,
    loras: Sequence[LoraSpec],
    out_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    single_file: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    config: str | None = None,
    stats: MergeStats | None = None,
    unmerge: bool = False,
) -> Path:
    """Write `model` with `loras` merged: a diffusers folder at `out_dir`, or (from a single-file .safetensors
    checkpoint) a single-file checkpoint at `single_file`. `model` is a diffusers folder, a single-file checkpoint,
    `tiny`/`sd15-shaped` (unless a path of that name exists), or a hub id. `dtype` casts every floating tensor
    written (default: keep each tensor's dtype); updates are computed in fp32 either way. Output is atomic: a
    failure leaves nothing behind. `unmerge`: take the LoRAs out of a model they were merged into (the same LoRAs
    and scales), which only additive kinds allow: a DoRA's update depends on the weight it was merged into."""
    if (out_dir is None) == (single_file is None):
        raise UserError("give either an output folder (--out) or a single-file output (--single-file)")
    out_dtype = models.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    stats = stats if stats is not None else MergeStats()
    target = Path(single_file if single_file is not None else out_dir).expanduser()
    # the output may replace only what sdlora wrote, and never the model, a LoRA or the config, nor a folder holding them
    inputs = [model, config, *(source for source, _ in loras if not isinstance(source, LoraState))]
    if single_file is not None:
        output_rules.check_output_file(target, inputs, "--single-file")
    else:
        output_rules.check_output_folder(target, inputs, "--out")
    loaded = _load_loras(negate(loras) if unmerge else loras, allow_pickle)  # before any output, so a bad LoRA leaves nothing behind
    if unmerge:
        _check_undoable(loaded)
    if models.is_builtin_model(str(model)) and single_file is None:
        with tempfile.TemporaryDirectory(prefix="sdlora-merge-") as folder:
            source = models.write_tiny_model(Path(folder, "model"), variant=str(model))
            return _merge_folder(source, loaded, target, out_dtype, stats)
    path = Path(model).expanduser()
    if single_file is not None:
        if not (path.is_file() and path.suffix.lower() == ".safetensors"):
            raise UserError(f"--single-file needs a single-file .safetensors checkpoint as --model, got {model}")
        if target.suffix.lower() != ".safetensors":
            raise UserError(f"--single-file output {target} must end in .safetensors")
        return _merge_single_file(path, loaded, target, out_dtype, stats)
    if path.is_dir():
        models.check_model_dir(path)
        return _merge_folder(path, loaded, target, out_dtype, stats)
    # a checkpoint or hub id becomes a diffusers folder only through a full load, so merge it in memory
    pipe = models.load_pipeline(str(model), config=config, allow_pickle=allow_pickle)
    _merge_pipeline(pipe, loaded, stats)
    if out_dtype is not None:
        pipe.to(dtype=out_dtype)
    return models.save_pipeline(pipe, target, command="merge")


# ---------------------------------------------------------------- planning: which weight each module updates


def _load_loras(loras: Sequence[LoraSpec], allow_pickle: bool) -> list[_Lora]:
    if not loras:
        raise UserError("no LoRA given: pass at least one --lora FILE[:SCALE]")
    loaded = []
    for index, (source, scale) in enumerate(loras):
        if not math.isfinite(float(scale)):
            raise UserError(f"LoRA scale {scale} is not a finite number")
        if isinstance(source, LoraState):
            loaded.append(_Lora(f"LoRA #{index + 1}", source, float(scale)))
        else:
            loaded.append(_Lora(str(source), read_lora(source, allow_pickle=allow_pickle), float(scale)))
        loaded[-1].state.check_finite(loaded[-1].label)
    return loaded


def _check_undoable(loras: Sequence[_Lora]) -> None:
    """Refuse to unmerge a kind whose update is not additive (merging its negation does not give W back)."""
    for lora in loras:
        path = next((p for p, m in lora.state.modules.items() if not m.additive), None)
        if path is not None:
            kind = KIND_NAMES[lora.state.modules[path].kind]
            raise UserError(
                f"{lora.label}: module {path} is {kind}, whose update depends on the weight it was merged into: "
                "unmerge cannot undo it; start again from the model without it"
            )


def _components(loras: Sequence[_Lora]) -> list[str]:
    present = {component for lora in loras for component in lora.state.components()}
    return [component for component in COMPONENTS if component in present]


def _plan(
    loras: Sequence[_Lora],
    family: ModelFamily,
    layers: Mapping[str, LayerLookup],
    where: str,
    model_description: str,
    locate: Callable[..., WeightSlot | None] = lambda component, name, param="weight": WeightSlot(f"{component}.{name}.{param}"),
    component: str | None = None,
) -> Plan:
    """The updates each weight receives (of one `component`'s modules, or all), keyed by where `locate(component,
    layer name, param="weight")` puts them (None: the layer has no such tensor); a component the family lacks, a
    module that matches no weight or does not fit is an error naming both architectures."""
    plan: Plan = {}
    for lora in loras:
        check_components(lora.state, family, lora.label, model_description)
        state = lora.state if component is None else lora.state.restricted_to(component)
        match = match_lora(state, layers, lora.label, model_description, made_for=lora_architecture(lora.state))
        match.require_all(lora.label, where)
        for path, (name, module) in match.modules.items():
            owner = path.partition(".")[0]
            target = locate(owner, name)
            plan.setdefault(target.key, []).append(_Update(path, module, lora.scale, target))
            bias = module.bias_update()
            if bias is not None:  # a full diff's bias difference, into the layer's bias
                bias_target = locate(owner, name, "bias")
                if bias_target is None:
                    raise UserError(f"{lora.label}: LoRA module {path} changes a bias, and {where} has no bias for it")
                plan.setdefault(bias_target.key, []).append(_Update(path + BIAS_LABEL, bias, lora.scale, bias_target))
    return plan


# ---------------------------------------------------------------- arithmetic


_PIECE_BYTES = 1 << 20  # rows merged at a time: about 1 MiB of fp32, so a piece stays in a core's cache


def _merged(weight: torch.Tensor, updates: list[_Update], out_dtype: torch.dtype, name: str, stats: MergeStats) -> torch.Tensor:
    """weight + sum(scale * update), computed in fp32 and cast to `out_dtype`, in pieces of rows small enough to stay
    in cache: each stored row is read once and written once, whatever its dtype. `weight` (a buffer of the caller's)
    is overwritten when `out_dtype` is its own dtype."""
    start = time.perf_counter()
    flat = weight.reshape(weight.shape[0], -1)
    result = flat if out_dtype == weight.dtype else torch.empty(flat.shape, dtype=out_dtype)
    # a transposed or half-swapped update (OpenCLIP's text_projection, SD3's continuous norms: small matrices), or a
    # kind whose update spans all rows (a norm, a Kronecker product), needs the whole tensor at once
    whole = any(u.target.transposed or u.target.swapped or not u.module.by_rows for u in updates)
    rows_per_piece = flat.shape[0] if whole else max(1, _PIECE_BYTES // (4 * flat.shape[1]))
    finite = True
    for begin in range(0, flat.shape[0], rows_per_piece):
        end = min(flat.shape[0], begin + rows_per_piece)
        piece = flat[begin:end].to(torch.float32)  # a copy, or the rows themselves when fp32 (updated in place)
        for update in updates:
            first, last = update.target.rows or (0, flat.shape[0])  # the stored rows this module's update covers
            low, high = max(begin, first), min(end, last)
            if low >= high:
                continue
            part = piece[low - begin : high - begin]  # a row slice of a contiguous tensor stays contiguous
            if update.target.transposed:  # stored for x @ W: update W, store it back transposed
                part.copy_(update.module.apply(part.T.contiguous(), update.scale).T)
            elif update.target.swapped:  # stored (shift, scale), updated as diffusers' (scale, shift)
                half = part.shape[0] // 2
                weight_rows = update.module.apply(torch.cat([part[half:], part[:half]]), update.scale)
                part.copy_(torch.cat([weight_rows[half:], weight_rows[:half]]))
            elif whole:
                update.module.apply(part, update.scale)
            else:
                update.module.apply(part, update.scale, rows=(low - first, high - first))
        if piece.data_ptr() != result[begin:end].data_ptr():
            result[begin:end] = piece
        # the sum is a cheap screen (of the cast values: fp16 can overflow); a non-finite one pays for the exact check
        finite = finite and bool(torch.isfinite(result[begin:end].sum(dtype=torch.float32)) or torch.isfinite(result[begin:end]).all())
    if not finite:
        culprits = ", ".join(sorted({update.label for update in updates}))
        raise UserError(
            f"merging {culprits} gives NaN or inf in weight {name} ({str(out_dtype).removeprefix('torch.')}): refusing to write; is the LoRA broken or a scale too large?"
        )
    stats.tensors += 1
    stats.bytes_touched += weight.nbytes + result.nbytes + sum(t.nbytes for u in updates for t in u.module.factors().values())
    stats.arithmetic_s += time.perf_counter() - start
    return result.view(weight.shape)


def _stream(
    header: Header, target: Path, plan: Plan, out_dtype: torch.dtype | None, stats: MergeStats, metadata: dict[str, str] | None = None
) -> int:
    """Rewrite one safetensors file: planned weights merged, floats cast to `out_dtype`, the rest copied as bytes;
    `metadata` added to the header's."""
    cast_to = DTYPE_NAMES[out_dtype] if out_dtype is not None else None
    changed = {}
    for name, info in header.tensors.items():
        dtype = cast_to if cast_to and info.dtype in FLOAT_DTYPES else info.dtype
        if name in plan or dtype != info.dtype:
            changed[name] = dtype

    def transform(info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
        dtype = TORCH_DTYPES[changed[info.name]]
        return _merged(tensor, plan[info.name], dtype, info.name, stats) if info.name in plan else tensor.to(dtype)

    stats.modules += _module_count(plan)
    return rewrite(header, target, changed, transform, metadata)


def _module_count(plan: Plan) -> int:
    """LoRA modules in a plan: a full diff's bias update (labelled `PATH (bias)`) is part of its module."""
    return sum(not update.label.endswith(BIAS_LABEL) for updates in plan.values() for update in updates)


# ---------------------------------------------------------------- sources


def _merge_folder(source: Path, loras: list[_Lora], out_dir: Path, out_dtype: torch.dtype | None, stats: MergeStats) -> Path:
    """Copy a diffusers folder, merging into the weight files of each component the LoRAs adapt."""
    plans: dict[Path, Plan] = {}
    headers: dict[Path, Header] = {}
    adapted = _components(loras)
    family, description = _describe_folder(source)
    for lora in loras:  # before any component folder is looked at
        check_components(lora.state, family, lora.label, description)
    for component in adapted:
        folder = source / component
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not files:
            raise UserError(f"the LoRA has {component} modules but {folder} holds no .safetensors weights")
        groups: dict[str, list[Path]] = {}  # one group per variant (fp16...), its shards together
        for file in files:
            groups.setdefault(_SHARD.sub("", file.name), []).append(file)
        for group in groups.values():
            headers.update({file: read_header(file) for file in group})
            owner = {name: file for file in group for name in headers[file].tensors}
            layers = {
                key.removesuffix(".weight"): Layer(headers[file].tensors[key].shape)
                for key, file in owner.items()
                if key.endswith(".weight")
            }
            # a tensor of this group's files, "weight" or a full diff's "bias" (None: the layer has no such tensor)
            plan = _plan(
                loras,
                family,
                {component: layers},
                str(group[0]),
                description,
                lambda _, name, param="weight", stored=owner: WeightSlot(f"{name}.{param}") if f"{name}.{param}" in stored else None,
                component,
            )
            for key, updates in plan.items():
                plans.setdefault(owner[key], {})[key] = updates
    written: dict[Path, int] = {}
    with atomic_dir(out_dir) as tmp:
        indexes = []
        for file in sorted(path for path in source.rglob("*") if not path.is_dir()):
            relative = file.relative_to(source)
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if file in plans or (out_dtype is not None and file.suffix == ".safetensors"):
                written[relative] = _stream(headers.get(file) or read_header(file), target, plans.get(file, {}), out_dtype, stats)
            elif relative.parts[0] in adapted and file.suffix.lower() in PICKLE_WEIGHTS:
                continue  # a pickle copy of merged weights would still hold the unmerged ones
            elif out_dtype is not None and file.name.endswith(".safetensors.index.json"):
                indexes.append(relative)
            else:
                shutil.copy2(file, target)
        output_rules.write_marker(tmp, "merge", __version__)
        for relative in indexes:  # a cast changes the shards' sizes, which the index records
            index = json.loads((source / relative).read_text(encoding="utf-8"))
            shards = {relative.parent / name for name in index.get("weight_map", {}).values()}
            index.setdefault("metadata", {})["total_size"] = sum(written.get(shard, 0) for shard in shards)
            (tmp / relative).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def _describe_folder(source: Path) -> tuple[ModelFamily, str]:
    """A diffusers folder's family, and the model as messages name it."""
    family = family_of_folder(source)
    config = source / family.denoiser / "config.json"
    try:
        width = denoiser_text_width(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError):
        return family, f"the {family.label} model in {source}"
    return family, describe_model(family, width)


class _SingleFileLayers:
    """One component's layers of a single-file checkpoint under their diffusers names, looked up through the LDM
    tables and the text encoder's layout (a `LayerLookup`: the file's own names are never turned back)."""

    def __init__(self, header: Header, component: str, family: ModelFamily, unet_table: Mapping[str, str]):
        self.header, self.component, self.unet_table = header, component, unet_table
        self.text_encoder = next((spec for spec in family.text_encoders if spec.component == component), None)
        self.shapes = {key: info.shape for key, info in header.tensors.items()}

    def target(self, name: str, param: str = "weight") -> WeightSlot | None:
        try:
            target = single_file_slot(self.component, f"{name}.{param}", self.unet_table, self.text_encoder, self.shapes)
        except ValueError:
            return None  # reported by the matcher as a module matching no weight
        return target if target.key in self.shapes else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.target(name) is not None

    def __getitem__(self, name: str) -> Layer:
        target = self.target(name)
        if target is None:
            raise KeyError(name)
        return Layer(target.shape(self.shapes[target.key]))


def _merge_single_file(path: Path, loras: list[_Lora], out_file: Path, out_dtype: torch.dtype | None, stats: MergeStats) -> Path:
    """Merge into a single-file checkpoint (a UNet's LDM names, SD3's MMDiT names), written as one."""
    header = read_header(path)
    family = family_of_single_file(header.tensors)
    components = _components(loras)
    check_single_file_parts(header.tensors, family, str(path), components)
    unet_table = ldm_unet_table_from_keys(header.tensors) if "unet" in components else {}
    layers = {component: _SingleFileLayers(header, component, family, unet_table) for component in components}
    # the width of the text the denoiser reads: a UNet's cross-attention, the MMDiT's context embedder's input
    text_reader = "attn2.to_k.weight" if family.denoiser == "unet" else "diffusion_model.context_embedder.weight"
    widths = [info.shape[1] for key, info in header.tensors.items() if key.endswith(text_reader)]
    description = describe_model(family, widths[0]) if widths else family.label
    plan = _plan(
        loras, family, layers, str(path), description, lambda component, name, param="weight": layers[component].target(name, param)
    )
    with atomic_file(out_file) as tmp:
        _stream(header, tmp, plan, out_dtype, stats, metadata={output_rules.WRITTEN_BY_KEY: __version__})
    return out_file
