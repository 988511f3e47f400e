"""Load a Stable Diffusion pipeline from `tiny`, a local diffusers folder, a single-file checkpoint or a hub id.

The model family (SD1, SD2, SDXL, SD3) is read off the model itself (`model_index.json` and the UNet config, or a single
file's keys) and picks the diffusers pipeline class, so no flag is needed.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..core.families import (
    SD1,
    ModelFamily,
    check_single_file_parts,
    family_by_name,
    family_of_folder,
    family_of_model_index,
    family_of_pipeline,
    family_of_single_file,
)
from ..core.files import read_tensors
from ..core.version import __version__
from ..errors import UserError
from ..storage import output_rules
from ..storage.atomic import atomic_dir
from ..storage.safetensors_stream import read_header, read_tensor
from .demo import demo_dir, demo_vocab, load_demo_pipeline
from .tiny import (
    build_sd3_shaped_pipeline,
    build_sd15_shaped_pipeline,
    build_sdxl_shaped_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    tiny_clip_vocab,
)

TINY = "tiny"
DEMO = "demo"
SD15_SHAPED = "sd15-shaped"
TINY_SDXL = "tiny-sdxl"
SDXL_SHAPED = "sdxl-shaped"
TINY_SD3 = "tiny-sd3"
SD3_SHAPED = "sd3-shaped"
# `--model NAME` builds these in memory (random weights; `demo` is pretrained, loaded from the package); the shaped
# ones have the real UNet (SD3.5 Medium's transformer) and VAE, for benchmarks
BUILTIN_MODELS = {
    TINY: build_tiny_pipeline,
    DEMO: load_demo_pipeline,
    SD15_SHAPED: build_sd15_shaped_pipeline,
    TINY_SDXL: build_tiny_sdxl_pipeline,
    SDXL_SHAPED: build_sdxl_shaped_pipeline,
    TINY_SD3: build_tiny_sd3_pipeline,
    SD3_SHAPED: build_sd3_shaped_pipeline,
}
# `sdlora tiny-model DIR --variant NAME` -> the built-in model it writes
TINY_MODEL_VARIANTS = {
    "tiny": TINY,
    "demo": DEMO,
    "sd15-shaped": SD15_SHAPED,
    "sdxl": TINY_SDXL,
    "sdxl-shaped": SDXL_SHAPED,
    "sd3": TINY_SD3,
    "sd3-shaped": SD3_SHAPED,
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# a single file's VAE: under one of these prefixes (diffusers' LDM_VAE_KEYS), with these LDM-named parts
_LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
_LDM_VAE_PARTS = ("encoder.down.0.", "encoder.mid.block_1.", "decoder.up.0.", "decoder.mid.block_1.")

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # a --dtype's choices: tuple(DTYPES)

# the help of options every command that loads a model or a LoRA shares (cli.py; training's TrainConfig too)
MODEL_HELP = (
    "a diffusers folder, a single-file checkpoint, a hub id, 'demo' (the pretrained 64 px demo model) or 'tiny' / "
    "'tiny-sdxl' / 'tiny-sd3' (random test models); SD1, SD2, SDXL or SD3 (LoRA files, not training), told from the model"
)
MODEL_CONFIG_HELP = "for a single-file checkpoint offline: a local diffusers folder of the same architecture, for its configs"
ALLOW_PICKLE_HELP = (
    "allow reading pickle files (.ckpt, .pt, .bin), LoRAs and models alike; weights only: one that would run code is refused"
)


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' -> torch dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def pipeline_class(family: ModelFamily):
    """The diffusers pipeline class of a family."""
    import diffusers  # takes seconds to import: only when a pipeline is made

    return getattr(diffusers, family.pipeline_class)


def save_pipeline(pipe, out_dir: str | os.PathLike, command: str = "save") -> Path:
    """Write a pipeline folder atomically, marked as sdlora's (`command` wrote it); tokenizers also get
    vocab.json/merges.txt for transformers 4 users."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for spec in family_of_pipeline(pipe).text_encoders:
            if getattr(pipe, spec.tokenizer, None) is not None:  # an optional encoder (SD3's T5) may be left out
                _write_tokenizer_files(getattr(pipe, spec.tokenizer), tmp / spec.tokenizer)
        output_rules.write_marker(tmp, command, __version__)
    return out_dir


def _write_tokenizer_files(tokenizer, folder: Path) -> None:
    if (folder / "vocab.json").exists():
        return
    ours = [vocabulary for vocabulary in (tiny_clip_vocab(), demo_vocab()) if tokenizer.get_vocab() == vocabulary[0]]
    if not ours:  # a real tokenizer saves its own files
        return
    vocab, merges = ours[0]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_tiny_model(out_dir: str | os.PathLike, variant: str = "tiny", seed: int = 0) -> Path:
    """Write a built-in pipeline as a diffusers folder: a random-weight one (`tiny`, `sd15-shaped`, `sdxl`,
    `sdxl-shaped`, `sd3`) or the pretrained `demo`, copied file for file from the package (`seed` does not apply to it)."""
    if variant not in TINY_MODEL_VARIANTS and variant not in BUILTIN_MODELS:
        raise UserError(f"unknown tiny-model variant {variant!r}: use one of {', '.join(TINY_MODEL_VARIANTS)}")
    output_rules.check_output_folder(out_dir, option="output folder")  # replaces only a folder sdlora wrote
    if TINY_MODEL_VARIANTS.get(variant, variant) == DEMO:
        source = demo_dir()
        with atomic_dir(Path(out_dir)) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            output_rules.write_marker(tmp, "tiny-model", __version__)
        return Path(out_dir)
    return save_pipeline(BUILTIN_MODELS[TINY_MODEL_VARIANTS.get(variant, variant)](seed=seed), out_dir, command="tiny-model")


def load_pipeline(
    model: str,
    *,
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    allow_pickle: bool = False,
):
    """A diffusers pipeline of the model's family from `tiny`, a diffusers folder, a single-file checkpoint or a hub id.

    `config` points a single-file checkpoint at a local diffusers folder (or hub id) for its configs, so it
    loads offline. Pickle checkpoints (.ckpt/.bin) load only with `allow_pickle`.
    """
    path = Path(model).expanduser()
    if is_builtin_model(model):
        return BUILTIN_MODELS[model]().to(dtype=dtype)
    if path.is_dir():
        family = check_model_dir(path)
        check_folder_pickles(path, allow_pickle)
        check_folder_files(path)
        components = {}
        if _unet_weight_files(path / "unet"):
            # read the UNet tensor by tensor (in the target dtype): peak memory is one UNet, not a mapped file + a copy
            components["unet"] = load_unet_streaming(path / "unet", dtype)
        cls = pipeline_class(family)
        try:
            return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **_pipeline_options(cls), **components)
        except (ValueError, RuntimeError) as err:  # what the checks above cannot see: a file that reads but does not fit
            raise UserError(
                f"could not load the model folder {path} ({_error_line(err)}): is a file in it damaged or of another model?"
            ) from err
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(
                f"{path} is a pickle checkpoint, which can run code when loaded: convert it to .safetensors or pass --allow-pickle"
            )
        family = SD1  # a pickle's keys cannot be read without unpickling it: diffusers' SD1 loader, as before
        if path.suffix.lower() == ".safetensors":
            # a truncated or mislabelled file, or one missing a part, fails here with one line, not deep inside diffusers
            keys = read_header(path).tensors
            family = family_of_single_file(keys)
            check_single_file_parts(keys, family, str(path))
            _check_single_file_vae(keys, path)
        kwargs = {"torch_dtype": dtype, **_pipeline_options(pipeline_class(family))}
        if config:
            kwargs["config"] = config
        from diffusers.loaders.single_file_utils import SingleFileComponentError  # lazy: diffusers, as pipeline_class

        try:
            return pipeline_class(family).from_single_file(str(path), **kwargs)
        except OSError as err:
            if path.suffix.lower() in PICKLE_SUFFIXES:
                _explain_pickle_failure(path)
            raise UserError(
                f"could not load single-file checkpoint {path} ({_first_line(err)}); offline, pass --model-config pointing at a local diffusers folder of the same architecture"
            ) from err
        except (SingleFileComponentError, ValueError, RuntimeError) as err:
            # a pickle's keys are only seen here (a .safetensors file's were checked above); or --model-config does not fit
            raise UserError(
                f"could not load single-file checkpoint {path} ({_error_line(err)}): is it a Stable Diffusion checkpoint, "
                "and --model-config a folder of its architecture?"
            ) from err
    if _looks_like_path(model):
        raise FileNotFoundError(f"model not found: {model} (expected a diffusers folder, a .safetensors file, a hub id or 'tiny')")
    return _from_hub(model, dtype)


def _check_single_file_vae(keys, path: Path) -> None:
    """A one-line error unless a single file holds a VAE in the LDM layout diffusers converts (`encoder.down.N`,
    `decoder.up.N`, `mid.block_1`...): diffusers-named VAE keys there would load as empty (meta) tensors."""
    prefix = next((p for p in _LDM_VAE_PREFIXES if any(key.startswith(p) for key in keys)), None)
    if prefix is None:
        raise UserError(f"{path} has no VAE ({' or '.join(p + '*' for p in _LDM_VAE_PREFIXES)} keys): use a checkpoint that includes one")
    if not all(any(key.startswith(prefix + part) for key in keys) for part in _LDM_VAE_PARTS):
        raise UserError(
            f"{path}: the VAE keys ({prefix}*) are not in the LDM layout single-file checkpoints use ({prefix}encoder.down.0..., "
            f"{prefix}decoder.up.0...): write the VAE under LDM names, or load the model as a diffusers folder"
        )


def load_vae(source: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """An AutoencoderKL from a VAE folder (or a pipeline folder's vae/), a single .safetensors file or a hub id,
    to use in place of a model's own (e.g. a VAE fixed to run in fp16)."""
    from diffusers import AutoencoderKL  # takes seconds to import: only when a model is loaded

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--vae {source}: no config.json there (expected a diffusers VAE folder)")
        check_folder_pickles(folder, allow_pickle)
        check_folder_files(folder)
        try:
            return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        except (ValueError, RuntimeError) as err:  # as in load_pipeline
            raise UserError(
                f"could not load the VAE folder {folder} ({_error_line(err)}): is a file in it damaged or of another model?"
            ) from err
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"VAE file not found: {path}")
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(f"{path} is a pickle file, which can run code when loaded: convert it to .safetensors or pass --allow-pickle")
        if path.suffix.lower() == ".safetensors":
            read_header(path)  # a truncated or mislabelled file fails here with one line
        try:
            return AutoencoderKL.from_single_file(str(path), torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load the VAE file {path} ({_first_line(err)}); offline, pass a diffusers VAE folder") from err
    if _looks_like_path(source):
        raise FileNotFoundError(f"VAE not found: {source} (expected a diffusers VAE folder, a .safetensors file or a hub id)")
    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load the VAE {source!r} from the Hugging Face hub ({_first_line(err)}); without internet, pass a local VAE folder"
        ) from err


def _from_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline  # takes seconds to import: only when a pipeline is made

    try:
        index = DiffusionPipeline.load_config(repo_id)
        # SD1 and SD2 share a pipeline class, so the index alone picks the right one
        cls = pipeline_class(family_of_model_index(index))
        return cls.from_pretrained(repo_id, torch_dtype=dtype, **_pipeline_options(cls))
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load {repo_id!r} from the Hugging Face hub ({_first_line(err)}); without internet, pass a local diffusers folder or .safetensors file"
        ) from err


def check_folder_pickles(folder: Path, allow_pickle: bool) -> None:
    """A model folder part whose weights are only pickle files (`pytorch_model.bin`...) loads only with `allow_pickle`:
    unpickling can run code, as a single .ckpt can."""
    if allow_pickle:
        return
    for part in _folder_parts(folder):
        files = [entry for entry in part.iterdir() if entry.is_file()]
        pickles = [entry for entry in files if entry.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(entry.suffix == ".safetensors" for entry in files):
            raise UserError(
                f"{pickles[0]} is a pickle file, which can run code when loaded, and {part} has no .safetensors weights: "
                "convert it to .safetensors or pass --allow-pickle"
            )


def check_folder_files(folder: Path) -> None:
    """Read every .json file of a model folder and its parts, and every .safetensors file's header: a damaged one
    is named in one line here, not met deep inside diffusers or transformers as a JSON or deserializing error."""
    for part in _folder_parts(folder):
        for file in sorted(part.iterdir()):
            if file.suffix == ".safetensors" and file.is_file():
                read_header(file)  # checks that every tensor lies inside the file, as a truncated download's does not
            elif file.suffix == ".json" and file.is_file():
                try:
                    json.loads(file.read_text(encoding="utf-8"))
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    raise UserError(f"{file} is not valid JSON ({_first_line(err)}): the model folder is damaged") from err


def _folder_parts(folder: Path) -> list[Path]:
    """A model folder and its subfolders (unet/, vae/, text_encoder/...)."""
    return [folder, *(entry for entry in sorted(folder.iterdir()) if entry.is_dir())]


def _unet_weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "diffusion_pytorch_model.safetensors"
    return [single] if single.is_file() else []


def load_unet_streaming(folder: Path, dtype: torch.dtype):
    """A UNet2DConditionModel from a diffusers folder, each tensor read and cast on its own (no fp32 copy of the whole)."""
    from diffusers import UNet2DConditionModel  # takes seconds to import: only when a model is loaded

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    state = {}
    for file in _unet_weight_files(folder):
        header = read_header(file)
        fd = os.open(file, os.O_RDONLY)
        try:
            for name, info in header.tensors.items():
                state[name] = read_tensor(fd, info).to(dtype)
        finally:
            os.close(fd)
    expected = unet.state_dict()
    for name, tensor in state.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise UserError(
                f"{folder}: UNet weight {name} is {list(tensor.shape)} but its config.json makes it {list(expected[name].shape)}: "
                "the weights and the config are of different models"
            )
    missing, unexpected = unet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UserError(f"{folder}: UNet weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return unet.eval()


def check_model_dir(path: Path) -> ModelFamily:
    """The family of a diffusers folder; a one-line error if it is not a Stable Diffusion folder with every part."""
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    family = family_of_folder(path)
    for part in family.required_parts:
        if not (path / part).is_dir():
            raise FileNotFoundError(
                f"model folder {path} has no {part}/ subfolder ({family.label} models need {', '.join(family.required_parts)})"
            )
    return family


def _pipeline_options(cls) -> dict:
    """No safety checker (SD1/SD2 pipelines: sdlora generates what it is asked) and no watermark (SDXL: it needs an
    optional package and changes every image), for the pipeline classes that have them."""
    parameters = inspect.signature(cls.__init__).parameters
    options = {"safety_checker": None, "add_watermarker": False}
    return {name: value for name, value in options.items() if name in parameters}


def _explain_pickle_failure(path: Path) -> None:
    """diffusers' error for a pickle it would not load says nothing useful: load it weights-only to say why."""
    read_tensors(path, allow_pickle=True)  # raises the one-line reason: code inside, truncated, not a pickle


# the family of each built-in model, known without building it
_BUILTIN_FAMILIES = {TINY_SDXL: "sdxl", SDXL_SHAPED: "sdxl", TINY_SD3: "sd3", SD3_SHAPED: "sd3"}


def peek_family(model: str) -> ModelFamily | None:
    """The family of a built-in model, a diffusers folder or a .safetensors single file, from names, configs or
    keys alone (nothing loaded); None where that cannot tell (a hub id, a pickle, a damaged folder: loading says why)."""
    path = Path(model).expanduser()
    try:
        if is_builtin_model(model):
            return family_by_name(_BUILTIN_FAMILIES.get(model, "sd1"))
        if path.is_dir() and (path / "model_index.json").is_file():
            return family_of_folder(path)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return family_of_single_file(read_header(path).tensors)
    except (UserError, OSError):
        return None
    return None


# the training side of each built-in model (its denoiser's sample size times the VAE's factor), known without building it
_BUILTIN_RESOLUTIONS = {TINY: 64, DEMO: 64, SD15_SHAPED: 512, TINY_SDXL: 64, SDXL_SHAPED: 1024, TINY_SD3: 64, SD3_SHAPED: 1024}


def peek_resolution(model: str) -> int | None:
    """The side in pixels a model generates at by default (what training takes when --resolution is not given), from a
    built-in name or a diffusers folder's configs alone; None where that cannot tell (a single file, a hub id)."""
    path = Path(model).expanduser()
    if is_builtin_model(model):
        return _BUILTIN_RESOLUTIONS[model]
    try:
        denoiser = next((path / part / "config.json" for part in ("unet", "transformer") if (path / part / "config.json").is_file()), None)
        if denoiser is None:
            return None
        sample_size = json.loads(denoiser.read_text(encoding="utf-8"))["sample_size"]
        vae_levels = len(json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    side = sample_size[0] if isinstance(sample_size, list) else sample_size
    return int(side) * 2 ** (vae_levels - 1) if isinstance(side, int) else None  # diffusers' vae_scale_factor


def is_builtin_model(model: str) -> bool:
    """A built-in model name (`tiny`, `sd15-shaped`, `tiny-sdxl`, `sdxl-shaped`); an existing folder of that name wins."""
    return model in BUILTIN_MODELS and not Path(model).expanduser().exists()


def is_hub_id(model: str) -> bool:
    """`owner/name` that is no local path: what a model card's `base_model` may name."""
    return "/" in model and not _looks_like_path(model) and not Path(model).expanduser().exists()


def _looks_like_path(model: str) -> bool:
    """True unless `model` has the shape of a hub id: `name` or `owner/name`."""
    return model.startswith((".", "~")) or not HUB_ID.fullmatch(model)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _error_line(err: BaseException) -> str:
    """`Type: first line` of a library's error, whose message alone may not say what kind it is (JSON, safetensors...);
    a first line that only announces a list (torch's `Error(s) in loading state_dict for X:`) with the list's first."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(err).__name__}: {text}"
