"""Read and write LoRA files: safetensors first, pickle only when asked; atomic writes; metadata; A1111's hash."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from ..errors import UserError
from ..storage.atomic import atomic_file, check_writable_target
from ..storage.output_rules import WRITTEN_BY_KEY
from ..storage.safetensors_stream import read_header, rewrite
from . import formats
from .families import SD1, ModelFamily, family_of_lora
from .kinds import DoraModule
from .state import FORMAT_METADATA_KEY, LoraState
from .version import __version__

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string header of a LoRA file; pickle files only with `allow_pickle` (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"{path} is not a readable .safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__}): is it truncated or of another kind?"
        ) from err
    return tensors, metadata


def _read_pickle(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not allow_pickle:
        raise UserError(f"{path} is a pickle file, which can run code when loaded: convert it to .safetensors or pass --allow-pickle")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about plain (non-zip) pickles; the error below says all a user needs
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # weights_only: tensors and plain containers only, never arbitrary objects, even with the flag
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        if "Weights only load failed" in str(err):
            # torch's own message suggests weights_only=False: the one thing we must not do
            raise UserError(
                f"{path} holds Python objects besides tensors, which could run code when loaded: refused even with --allow-pickle"
            ) from err
        raise UserError(
            f"{path} could not be loaded as a weights-only pickle ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a flat dictionary of tensors")
    return dict(loaded), {}


def read_lora(path: str | os.PathLike, allow_pickle: bool = False, fmt: str | None = None) -> LoraState:
    """Read a LoRA file of any supported format (detected from its keys) into a `LoraState`."""
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle)
    adapter_config = _adapter_config_beside(path)
    try:
        fmt = fmt or formats.detect_format(tensors)
        state = formats.to_lora_state(tensors, metadata, fmt, adapter_config)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err
    state.metadata[FORMAT_METADATA_KEY] = fmt
    return state


@dataclass
class LoraFile:
    """A LoRA file read once: its path, its LoraState and A1111's short hash of it."""

    path: Path
    state: LoraState
    file_hash: str


def open_lora(path: str | os.PathLike, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file of any supported format and hash it (what loading it into a pipeline records)."""
    return LoraFile(Path(path), read_lora(path, allow_pickle=allow_pickle), lora_file_hash(path))


def _adapter_config_beside(path: Path) -> dict | None:
    """peft's adapter_config.json next to a peft-native adapter_model.safetensors."""
    config_path = path.parent / "adapter_config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path} is not valid JSON: {err}") from err


def _check_finite(state: LoraState) -> None:
    bad = state.non_finite_modules()
    if bad:
        raise UserError(f"LoRA module {bad[0]} holds NaN or inf values: refusing to write a broken file")


def lora_family(state: LoraState) -> ModelFamily:
    """The family whose files `state` is written as: the one its shapes or metadata say, else SD1 (test models)."""
    return family_of_lora(state) or SD1


def write_diffusers(state: LoraState, out_path: str | os.PathLike, family: ModelFamily | None = None) -> Path:
    """Write the diffusers format through the family pipeline's `save_lora_weights` (LoraConfig in the header).

    `family`: the model the LoRA is for, when the caller knows it (training); else judged from the LoRA."""
    out_path = check_writable_target(out_path)
    _check_finite(state)
    family = family or lora_family(state)
    layers = formats.to_diffusers_layers(state)
    kwargs = {}
    for component, (tensors, config) in layers.items():
        if component not in family.components:
            raise UserError(f"this LoRA has {component} modules, which {family.label} models do not have")
        kwargs[f"{component}_lora_layers"] = tensors
        kwargs[f"{component}_lora_adapter_metadata"] = config
    import diffusers  # after the checks: importing it takes seconds

    pipeline_class = getattr(diffusers, family.pipeline_class)
    held = inspect.signature(pipeline_class.save_lora_weights).parameters
    other = next((component for component in layers if f"{component}_lora_layers" not in held), None)
    if other is not None:  # SD3's T5: diffusers' SD3 files hold the transformer and the two CLIP encoders only
        raise UserError(
            f"diffusers' {family.label} LoRA files cannot hold {other} modules ({family.pipeline_class}.save_lora_weights has no place for them): write it as kohya"
        )
    with atomic_file(out_path) as tmp:
        staged = tmp.with_name(f"{tmp.stem}-staged.safetensors")
        try:
            pipeline_class.save_lora_weights(save_directory=str(tmp.parent), weight_name=staged.name, **kwargs)
            # diffusers' header, with the mark that lets a later sdlora run replace the file
            rewrite(read_header(staged), tmp, {}, lambda _, tensor: tensor, {WRITTEN_BY_KEY: __version__})
        finally:
            staged.unlink(missing_ok=True)
    return out_path


def kohya_metadata(state: LoraState, extra: dict[str, str] | None = None, family: ModelFamily | None = None) -> dict[str, str]:
    """The `ss_*` header a UI shows: network dim/alpha, module, base model version (from shapes)."""
    rank, alpha = state.most_common_rank_alpha()
    family = family or family_of_lora(state)  # None: shapes of no known family (test models): said as "unknown"
    kinds = state.kinds()
    metadata = {
        # kohya's and the UIs' name for the code that made the network: LyCORIS's for its kinds
        "ss_network_module": "networks.lora" if kinds == ["lora"] else "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": family.ss_base_model_version if family else "unknown",
        "ss_v2": str(family is not None and family.name == "sd2"),
        "ss_network_args": json.dumps(kohya_network_args(state)),
        "ss_training_comment": "written by sdlora",
        "modelspec.architecture": family.modelspec_architecture if family else "unknown",
    }
    metadata.update(
        {k: v for k, v in state.metadata.items() if k.startswith(("ss_", "modelspec.", "sdlora_")) and k != FORMAT_METADATA_KEY}
    )
    metadata.update(extra or {})
    metadata[WRITTEN_BY_KEY] = __version__  # a later sdlora run may replace the file
    return metadata


def kohya_network_args(state: LoraState) -> dict[str, str]:
    """kohya's network args UIs show beside network dim/alpha: conv_dim/conv_alpha of 3x3-conv (LoCon) modules,
    LyCORIS's `algo` (and `dora_wd`, with `wd_on_output=False` for magnitudes per input column) for its kinds."""
    args = {}
    # a DoRA's algo is the kind it sits on (LyCORIS: algo=locon with dora_wd=True)
    kinds = sorted({m.inner.kind if isinstance(m, DoraModule) else m.kind for m in state.modules.values()})
    if state.kinds() != ["lora"]:
        # LyCORIS's algo names (`lycoris.kohya` reads them), where they are not the kind's own
        args["algo"] = "+".join({"lora": "locon", "oft": "diag-oft"}.get(kind, kind) for kind in kinds)
    if "dora" in state.kinds():
        args["dora_wd"] = "True"
        if all(not m.on_output for m in state.modules.values() if isinstance(m, DoraModule)):
            args["wd_on_output"] = "False"  # lycoris.kohya's default is True
    conv = [
        (m.rank, m.effective_alpha)
        for m in state.modules.values()
        if m.rank is not None and m.effective_alpha is not None and len(m.weight_shape()) == 4 and (m.weight_shape()[-1] or 1) > 1
    ]
    if conv:
        args |= {"conv_dim": str(max(rank for rank, _ in conv)), "conv_alpha": f"{max(alpha for _, alpha in conv):g}"}
    return args


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya's train_util computes them (`precalculate_safetensors_hashes`):
    the file as safetensors would write it with only the `ss_*` metadata; the model hash is the SHA-256 of its tensor
    data (everything after the header), the legacy hash the first 8 hex digits of the SHA-256 of its 64 KiB at 1 MiB."""
    data = safetensors_bytes(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[header:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


def write_kohya(
    state: LoraState, out_path: str | os.PathLike, extra_metadata: dict[str, str] | None = None, family: ModelFamily | None = None
) -> Path:
    """Write the kohya/A1111/ComfyUI format with a real `.alpha` per module and `ss_*` metadata."""
    out_path = check_writable_target(out_path)
    _check_finite(state)
    tensors = formats.to_kohya(state, family or lora_family(state))
    metadata = kohya_metadata(state, extra_metadata, family)
    metadata |= kohya_hashes(tensors, metadata)
    with atomic_file(out_path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out_path


def write_lora(
    state: LoraState,
    out_path: str | os.PathLike,
    fmt: str,
    extra_metadata: dict[str, str] | None = None,
    family: ModelFamily | None = None,
) -> Path:
    """Write `state` in `fmt` ('diffusers' or 'kohya'), for `family` (default: judged from the LoRA)."""
    if fmt == formats.DIFFUSERS:
        return write_diffusers(state, out_path, family)
    if fmt == formats.KOHYA:
        return write_kohya(state, out_path, extra_metadata, family)
    raise UserError(f"cannot write format {fmt!r}: use one of {', '.join(formats.WRITABLE)}")


def lora_file_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of a LoRA file: sha256 of a .safetensors file's tensor data (header skipped), 12 hex digits.

    Skipping the header keeps the hash when only metadata changes; other files are hashed whole.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if Path(path).suffix.lower() == ".safetensors":
            header = handle.read(8)
            if len(header) == 8:
                handle.seek(8 + struct.unpack("<Q", header)[0])
            else:
                handle.seek(0)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
