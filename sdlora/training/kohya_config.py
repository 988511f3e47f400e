"""kohya's own training config as it is: sd-scripts' `--config_file` TOML (keys are its argument names, as
library/train_util.py's `add_*_arguments` and train_network.py declare them) and kohya_ss's saved JSON (the GUI's
names, renamed to sd-scripts' ones first), turned into sdlora's flat training options.

One table (`KEYS`) says what becomes of each sd-scripts key: carried out (a rename, or a converter where the
meaning differs), ignored (it has no effect on the trained LoRA: attention kernels, loader threads, memory
placement; the run names them in one line), or refused unless at kohya's default (one line naming the key and what
to do instead). An unknown key or a value of the wrong type is one line naming the key. Where sd-scripts' default
differs from sdlora's (network_alpha 1, network_dim 4, learning_rate 2e-6, 1600 steps, the text encoder trained,
no buckets, `.caption` files, no mixed precision, epsilon prediction), kohya's default is the one used, so a
config means what it meant to sd-scripts.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import blocks
from .config import SECTION_OF, SECTIONS
from .optimizers import parse_optimizer_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_STR, _INT, _FLOAT, _BOOL = (str,), (int,), (int, float), (bool,)
Options = dict[str, Any]
Converter = Callable[[Any, dict[str, Any]], Options]


@dataclass(frozen=True)
class Key:
    """What becomes of one sd-scripts key: `to` an sdlora option (renamed) or a converter (value, the whole config)
    -> options; `ignored` (why it changes nothing) or `refused` (what to do instead) unless at `default`."""

    types: tuple[type, ...] | None  # None: any value
    to: str | Converter | None = None
    ignored: str = ""
    refused: str = ""
    default: Any = None
    sd3: bool = False  # an option of train_util.py that only sd3_train_network.py reads: ignored in other configs


def _to(option: str, types: tuple[type, ...]) -> Key:
    return Key(types, option)


def _ignored(why: str, types: tuple[type, ...] | None = None) -> Key:
    return Key(types, ignored=why)


def _refused(instead: str, types: tuple[type, ...] | None = None, default: Any = None) -> Key:
    return Key(types, refused=instead, default=default)


def _sd3(to: str | Converter, types: tuple[type, ...]) -> Key:
    return Key(types, to, ignored="for SD3 only (sd3_train_network.py)", sd3=True)


# ---------------------------------------------------------------- converters where the meaning differs


def _resolution(value: Any, config: dict[str, Any]) -> Options:
    """`"512"`, `"512,768"` (width,height) or kohya_ss's `"512,512"`: sdlora's --resolution is one side (buckets of its
    area); a non-square size is a dataset TOML's `resolution = [w, h]`."""
    text = str(value).strip()
    try:
        sides = [int(part) for part in text.split(",")] if isinstance(value, str) else [value]
    except ValueError:
        raise UserError(f"kohya config: resolution = {value!r} must be 'SIZE' or 'WIDTH,HEIGHT', e.g. '512' or '768,512'") from None
    if len(sides) == 2 and sides[0] == sides[1]:
        sides = sides[:1]
    if len(sides) != 1:
        raise UserError(
            f"kohya config: resolution = {value!r} is not square; sdlora's --resolution is one side: give 'SIZE', or put "
            f"resolution = [{', '.join(map(str, sides))}] in a dataset_config TOML"
        )
    return {"resolution": sides[0]}


def _lr_warmup(value: Any, config: dict[str, Any]) -> Options:
    """An integer is steps; a float below 1 a fraction of max_train_steps (train_util's int_or_float)."""
    if isinstance(value, int) or value >= 1:
        return {"lr_warmup_steps": int(value)}
    if "max_train_epochs" in config:
        raise UserError(
            f"kohya config: lr_warmup_steps = {value} is a fraction of the steps, which a run of max_train_epochs only knows "
            "once its images are read: give the warm-up in steps"
        )
    return {"lr_warmup_steps": int(value * config.get("max_train_steps", KOHYA_STEPS))}


_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _lr_scheduler(value: Any, config: dict[str, Any]) -> Options:
    if value not in _SCHEDULERS:
        raise UserError(f"kohya config: lr_scheduler = {value!r} is not one sdlora trains with; use one of {', '.join(_SCHEDULERS)}")
    return {"lr_scheduler": value}


# sd-scripts' optimizer_type (compared lower-case, as train_util's get_optimizer does) -> sdlora's --optimizer
_OPTIMIZERS = {"": "adamw", "adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "lion": "lion", "adafactor": "adafactor"}
# each optimizer's own weight decay, which kohya leaves it (it passes only optimizer_args): torch's AdamW and
# bitsandbytes' 1e-2, Prodigy's, lion-pytorch's and transformers' Adafactor's 0
_OWN_WEIGHT_DECAY = {"adamw": 1e-2, "adamw8bit": 1e-2, "prodigy": 0.0, "lion": 0.0, "adafactor": 0.0}
# the constructor defaults sdlora adds to its own optimizers but kohya does not: back to the packages' own
_PACKAGE_DEFAULTS = {
    "prodigy": {"d_coef": "1.0", "use_bias_correction": "False", "safeguard_warmup": "False"},
    "adafactor": {"scale_parameter": "True", "warmup_init": "False"},
}


def _optimizer(value: Any, config: dict[str, Any]) -> Options:
    """optimizer_type (or use_8bit_adam / use_lion_optimizer) with optimizer_args: the optimizer as kohya builds it,
    its weight decay that of optimizer_args or the package's own."""
    name = _OPTIMIZERS.get(str(value).lower())
    if config.get("use_8bit_adam"):
        name = "adamw8bit"
    if config.get("use_lion_optimizer"):
        name = "lion"
    if name is None:
        raise UserError(
            f"kohya config: optimizer_type = {value!r} is not one sdlora trains with; use AdamW, AdamW8bit, Prodigy, Lion or AdaFactor"
        )
    args = parse_optimizer_args(config.get("optimizer_args", []))
    if name == "adafactor" and args.get("relative_step", True):
        raise UserError(
            "kohya config: optimizer_type = 'AdaFactor' without relative_step=False finds its own step size (kohya's default); "
            'sdlora trains Adafactor at a fixed learning rate: add "relative_step=False" to optimizer_args'
        )
    items = [item for item in config.get("optimizer_args", []) if not item.replace(" ", "").startswith("weight_decay=")]
    items += [f"{key}={text}" for key, text in _PACKAGE_DEFAULTS.get(name, {}).items() if key not in args]
    return {"optimizer": name, "optimizer_args": items, "weight_decay": float(args.get("weight_decay", _OWN_WEIGHT_DECAY[name]))}


def _text_encoder_lr(value: Any, config: dict[str, Any]) -> Options:
    """One rate, or sd-scripts' list (one per text encoder; SDXL's second takes the first's when not given)."""
    rates = value if isinstance(value, list) else [value]
    if not rates:
        return {}
    if len(rates) > 2 or not all(isinstance(rate, (int, float)) and not isinstance(rate, bool) for rate in rates):
        raise UserError(f"kohya config: text_encoder_lr = {value!r} must be a number or a list of one or two numbers")
    if 0 in rates:  # kohya: 0 leaves that text encoder untrained
        raise UserError("kohya config: text_encoder_lr = 0 freezes a text encoder; set network_train_unet_only = true instead")
    return {"text_encoder_lr": float(rates[0])} | ({"text_encoder_2_lr": float(rates[1])} if len(rates) == 2 else {})


# network_args that sdlora carries out (the others: not yet, one line each); _LORA_ARGS for networks.lora only
_LORA_ARGS = (
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims", "block_alphas",
    "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
)  # fmt: skip
# lycoris.kohya's own (lycoris/kohya.py create_network); use_cp / use_conv_cp are its older names of use_tucker
_LYCORIS_ARGS = (
    "algo", "preset", "dora_wd", "wd_on_output", "factor", "decompose_both", "use_tucker", "use_cp", "use_conv_cp",
    "use_scalar", "train_norm", "rank_dropout_scale", "bypass_mode",
)  # fmt: skip
_LYCORIS_DROPOUTS = ("rank_dropout", "module_dropout")  # lycoris.kohya's, for LoHa and LoKr (peft's LoHaConfig/LoKrConfig)
_NETWORK_ARGS = ("conv_dim", "conv_alpha", *_LYCORIS_ARGS, *_LORA_ARGS)
# LyCORIS's algo -> sdlora's --kind (dora: algo lora/locon with dora_wd=True, as LyCORIS writes it)
KOHYA_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
_NOT_YET = "is not supported by sdlora's training yet"


def _network(value: Any, config: dict[str, Any]) -> Options:
    """network_module with network_args: kohya's networks.lora, or LyCORIS's LoRA/LoCon (`lycoris.kohya`, algo lora or
    locon). Both adapt every Linear and 1x1 conv of the transformer blocks (sdlora's --preset attn-ff); conv_dim adds
    the 3x3 convs of the ResNets and samplers (--preset all with --conv-rank/--conv-alpha)."""
    sd3 = is_sd3_config(config)
    module = config.get("network_module", "networks.lora_sd3" if sd3 else "networks.lora")
    if module == "networks.lora_sd3":
        return _network_sd3(config)
    if sd3:
        raise UserError(f"kohya config: network_module = {module!r} with SD3's keys {_NOT_YET}: sdlora trains SD3 with networks.lora_sd3")
    if module not in ("networks.lora", "lycoris.kohya"):
        raise UserError(
            f"kohya config: network_module = {module!r} {_NOT_YET}: sdlora trains networks.lora, networks.lora_sd3 and lycoris.kohya's "
            "lora/locon/loha/lokr"
        )
    args: dict[str, str] = {}
    for item in config.get("network_args", []):
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"kohya config: network_args item {item!r} is not key=value")
        args[key.strip()] = text.strip()
    algo = args.get("algo", "lora")
    if algo not in KOHYA_ALGOS:
        raise UserError(
            f"kohya config: network_args algo={algo} (LyCORIS {algo}) {_NOT_YET}: sdlora trains algo=lora, locon, loha and lokr "
            "(and dora_wd=True with lora/locon)"
        )
    for key in args:
        lycoris_only = key in _LYCORIS_ARGS and module != "lycoris.kohya"
        lycoris_dropout = key in _LYCORIS_DROPOUTS and KOHYA_ALGOS[algo] in ("loha", "lokr")
        if key not in _NETWORK_ARGS or lycoris_only or (key in _LORA_ARGS and module != "networks.lora" and not lycoris_dropout):
            raise UserError(
                f"kohya config: network_args {key}={args[key]} {_NOT_YET} with {module} (sdlora carries out conv_dim, conv_alpha; "
                "networks.lora's block, dropout and LoRA+ arguments; LyCORIS's factor, decompose_both, use_tucker, and its "
                "rank_dropout and module_dropout with algo=loha/lokr)"
            )
    if args.get("preset", "full") != "full":
        raise UserError(f"kohya config: network_args preset={args['preset']} {_NOT_YET}: sdlora trains LyCORIS's full preset")
    kind = KOHYA_ALGOS[algo]
    options: Options = {"preset": "attn-ff", "kind": kind}
    if module == "lycoris.kohya":
        options |= _lycoris_args(args, kind)
    if args.get("dora_wd", "false").strip().lower() in ("true", "1"):
        if kind != "lora":
            raise UserError(f"kohya config: network_args dora_wd=True with algo={algo}: sdlora trains DoRA on algo=lora/locon")
        options["kind"] = "dora"
        if not _true(args.get("wd_on_output", "true")):  # lycoris.kohya's default: the magnitude per output row
            options["dora_axis"] = "input"
    try:
        if int(args.get("conv_dim", 0)):
            options |= {"preset": "all", "conv_rank": int(args["conv_dim"]), "conv_alpha": float(args.get("conv_alpha", 1))}
    except ValueError as err:
        raise UserError(f"kohya config: network_args {err}: conv_dim is an integer, conv_alpha a number") from None
    return options | _lora_args(args, config)


def _true(text: str) -> bool:
    return text.strip().lower() in ("true", "1")


def _lycoris_args(args: dict[str, str], kind: str) -> Options:
    """lycoris.kohya's LoHa/LoKr network_args as sdlora's options (training.network.LycorisOptions): factor and
    decompose_both (LoKr), use_tucker (its older names use_cp, use_conv_cp), rank_dropout and module_dropout;
    use_scalar and train_norm refused in one line. LyCORIS 4.1.3's kohya network does not pass rank_dropout_scale
    on (its modules never scale there), so it is read and has no effect here either; it passes decompose_both as
    the text given, so that "decompose_both=False" turns it on in LyCORIS: sdlora reads it as a boolean."""
    options: Options = {}
    for key in ("use_scalar", "train_norm"):
        if _true(args.get(key, "false")):
            reason = "peft's LoHa/LoKr layers have no trained scalar" if key == "use_scalar" else "sdlora trains no norm layers"
            raise UserError(f"kohya config: network_args {key}={args[key]} {_NOT_YET} ({reason}): leave it out")
    try:
        if "factor" in args and int(args["factor"]) != -1:
            options["lokr_factor"] = int(args["factor"])
        options |= {key: float(args[key]) for key in _LYCORIS_DROPOUTS if key in args}
        conv_dim = int(args.get("conv_dim", "0") or 0)
    except ValueError:
        raise UserError("kohya config: network_args factor and conv_dim are integers, rank_dropout and module_dropout numbers") from None
    if _true(args.get("decompose_both", "false")):
        options["lokr_decompose_both"] = True
    if any(_true(args.get(key, "false")) for key in ("use_tucker", "use_cp", "use_conv_cp")):
        options["use_tucker"] = True
    if (options.get("lokr_factor") or options.get("lokr_decompose_both")) and kind != "lokr":
        raise UserError("kohya config: network_args factor and decompose_both split LoKr's halves: use them with algo=lokr")
    if options.get("use_tucker") and kind not in ("loha", "lokr"):
        raise UserError(
            "kohya config: network_args use_tucker with algo=lora/locon (LyCORIS's lora_mid) is not supported by sdlora's "
            "training yet: peft's LoRA has no Tucker form; use it with algo=loha or lokr"
        )
    if options.get("use_tucker") and not conv_dim:
        raise UserError("kohya config: network_args use_tucker shapes the 3x3 convs, which sdlora adapts with conv_dim: add conv_dim")
    if kind == "loha" and options.get("rank_dropout"):
        raise UserError(
            "kohya config: network_args rank_dropout with algo=loha: LyCORIS's LoHa keeps the other rows as they are, peft's "
            f"scales them by 1 / (kept fraction) {_NOT_YET}: leave it out or use algo=lokr"
        )
    return options


def _lora_args(args: dict[str, str], config: dict[str, Any]) -> Options:
    """networks.lora's block, dropout and LoRA+ network_args as sdlora's options, parsed as networks/lora.py
    create_network parses them: lists comma-separated (an empty down/mid/up entry is 0), down_lr_weight and
    up_lr_weight also kohya's named curves (sine, cosine, linear, reverse_linear, zeros, each with +offset) over
    the blocks of SD1/SD2 (12), or SDXL's (9) where the config says sdxl; conv_block_dims adapts the 3x3 convs
    (--preset all) at conv_alpha, 1 unless given, as kohya."""
    options: Options = {}
    count = blocks.SDXL_BLOCKS[0] if config.get("sdxl") else blocks.SD_BLOCKS[0]
    for key in _LORA_ARGS:
        if key not in args:
            continue
        text = args[key]
        try:
            if key in ("down_lr_weight", "up_lr_weight") and "," not in text:
                options[key] = None  # a named curve, expanded below (its own errors name it)
            elif key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
                options[key] = [float(part) if part.strip() else 0.0 for part in text.split(",")]
            elif key in ("block_dims", "conv_block_dims"):
                options[key] = [int(part) for part in text.split(",")]
            elif key in ("block_alphas", "conv_block_alphas"):
                options[key] = [float(part) for part in text.split(",")]
            else:
                options[key] = float(text)
        except ValueError:
            raise UserError(f"kohya config: network_args {key}={text}: give numbers, comma-separated for a list") from None
        if options[key] is None:
            options[key] = blocks.lr_weight_preset(text, count)
    if "conv_block_dims" in options:
        options["preset"] = "all"
        options.setdefault("conv_alpha", float(args.get("conv_alpha", 1)))
    return options


# networks/lora_sd3.py's network_args sdlora carries out: its block filter, and the dropouts and LoRA+ ratios it
# shares with networks.lora (read as networks.lora's)
_LORA_SD3_ARGS = ("train_block_indices", "rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                  "loraplus_text_encoder_lr_ratio")  # fmt: skip


def _network_sd3(config: dict[str, Any]) -> Options:
    """kohya's networks.lora_sd3: every Linear of the MMDiT's joint blocks (sdlora's --preset all on SD3, the same
    layers: tests/core/test_targets.py), train_block_indices as --lora-blocks, its dropouts and LoRA+ ratios as
    networks.lora's; its other network_args (emb_dims, per-type dims, split_qkv, train_t5xxl) not yet."""
    args: dict[str, str] = {}
    for item in config.get("network_args", []):
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep:
            raise UserError(f"kohya config: network_args item {item!r} is not key=value")
        if key not in _LORA_SD3_ARGS:
            raise UserError(
                f"kohya config: network_args {key}={text} {_NOT_YET} with networks.lora_sd3 (sdlora carries out {', '.join(_LORA_SD3_ARGS)})"
            )
        args[key] = text
    options: Options = {"preset": "all", "kind": "lora"}
    if "train_block_indices" in args:
        options["lora_blocks"] = args.pop("train_block_indices")
    return options | _lora_args(args, config)


# sd3_train_utils.py's add_sd3_training_arguments: a config with any of them (or networks.lora_sd3) is an SD3 one
SD3_KEYS = ("clip_l", "clip_g", "t5xxl", "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype", "t5xxl_max_token_length",
            "apply_lg_attn_mask", "apply_t5_attn_mask", "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate",
            "pos_emb_random_crop_rate", "enable_scaled_pos_embed", "training_shift")  # fmt: skip
# sd3_train_network.py's defaults where they are not sdlora's SD3 ones (train_util.py: weighting_scheme uniform;
# sd3_train_utils.py: training_shift 1.0, t5xxl_max_token_length 256); SD3 takes no prediction type
KOHYA_SD3_DEFAULTS: Options = {"timestep_sampling": "uniform", "flow_shift": 1.0, "t5_max_length": 256}
# kohya's one weighting_scheme (train_util.py's choices) as sdlora's two options: the sigma density (sd3_train_utils.py
# compute_density_for_timestep_sampling: uniform unless logit_normal or mode) and the loss weight
# (compute_loss_weighting_for_sd3: 1 unless sigma_sqrt or cosmap)
_WEIGHTING_SCHEMES = {
    "uniform": ("uniform", "none"), "none": ("uniform", "none"), "logit_normal": ("logit_normal", "none"),
    "mode": ("mode", "none"), "sigma_sqrt": ("uniform", "sigma_sqrt"), "cosmap": ("uniform", "cosmap"),
}  # fmt: skip


def is_sd3_config(config: dict[str, Any]) -> bool:
    """Whether sd-scripts' keys are sd3_train_network.py's (an SD3 key, or networks.lora_sd3)."""
    return config.get("network_module") == "networks.lora_sd3" or any(key in config for key in SD3_KEYS)


def _weighting_scheme(value: Any, config: dict[str, Any]) -> Options:
    if value not in _WEIGHTING_SCHEMES:
        raise UserError(f"kohya config: weighting_scheme = {value!r} must be one of {', '.join(_WEIGHTING_SCHEMES)}")
    sampling, weighting = _WEIGHTING_SCHEMES[value]
    return {"timestep_sampling": sampling, "flow_weighting": weighting}


_SD3_ENCODER_FILES = "sdlora loads SD3's text encoders with the model: give pretrained_model_name_or_path a diffusers folder or a single file with its encoders"


def _cache(value: Any, config: dict[str, Any]) -> Options:
    return {"cache": "disk"} if config.get("cache_latents_to_disk") else {}


def _flag(option: str, meaning: Callable[[Any], Any]) -> Converter:
    return lambda value, config: {option: meaning(value)}


def _keep_last(value: Any, config: dict[str, Any]) -> Options:
    """save_last_n_steps: checkpoints older than that many steps are removed (kohya), so about n / every are kept."""
    every = config.get("save_every_n_steps")
    if not every:
        raise UserError("kohya config: save_last_n_steps needs save_every_n_steps (sdlora keeps a number of its step checkpoints)")
    return {"keep_checkpoints": max(1, value // every)}


def _epoch_saves(value: Any, config: dict[str, Any]) -> Options:
    """save_every_n_epochs: nothing more than the final file when it is max_train_epochs or more (kohya_ss's usual 1
    with 1 epoch); sdlora's cadence is in steps."""
    epochs = config.get("max_train_epochs")
    if isinstance(epochs, int) and value >= epochs:
        return {}
    raise UserError(f"kohya config: save_every_n_epochs = {value} is not carried out by sdlora: {_NO_EPOCH_CADENCE}")


def _save_precision(value: Any, config: dict[str, Any]) -> Options:
    if value not in ("float", "fp16", "bf16"):
        raise UserError(f"kohya config: save_precision = {value!r} must be float, fp16 or bf16")
    return {"save_precision": {"float": "fp32"}.get(value, value)}


# sd-scripts' defaults where they are not sdlora's (train_util.py, train_network.py, networks/lora.py: dim 4)
KOHYA_STEPS = 1600
KOHYA_DEFAULTS: Options = {
    "rank": 4, "alpha": 1.0, "lr": 2e-6, "steps": KOHYA_STEPS, "train_text_encoder": True, "buckets": False,
    "caption_extension": ".caption", "mixed_precision": "no", "prediction_type": "epsilon", "checkpoint_every": 0,
    "validate_every": 0, "preset": "attn-ff", "weight_decay": 1e-2, "save_precision": "fp32", "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64,
}  # fmt: skip

_NO_EFFECT = "no effect on the trained LoRA"
_DATASET_TOML = "put it in a dataset_config TOML (sdlora reads kohya's), or remove it"
_NO_EPOCH_CADENCE = "sdlora counts in steps: use its _n_steps form"

# every sd-scripts training key of train_network.py / sdxl_train_network.py (library/train_util.py's add_*_arguments)
KEYS: dict[str, Key] = {
    # model
    "pretrained_model_name_or_path": _to("model", _STR),
    "vae": _to("vae", _STR),
    "v2": _ignored("sdlora tells SD2 from the model itself", _BOOL),
    "v_parameterization": Key(_BOOL, _flag("prediction_type", lambda v: "v_prediction" if v else "epsilon")),
    "sdxl": _ignored("sdlora tells SDXL from the model itself", _BOOL),
    "clip_skip": _refused("sdlora reads the text encoder's layer its family uses (clip_skip 2 is not supported yet)", _INT, 1),
    "max_token_length": _refused("captions are cut at 75 tokens, as kohya's default", _INT, 75),
    "tokenizer_cache_dir": _ignored(_NO_EFFECT, _STR),
    "no_half_vae": _ignored("sdlora's VAE precision follows the model family (fp32 where fp16 overflows)", _BOOL),
    "lowram": _ignored("where the model is loaded, " + _NO_EFFECT, _BOOL),
    "highvram": _ignored(_NO_EFFECT, _BOOL),
    "disable_mmap_load_safetensors": _ignored(_NO_EFFECT, _BOOL),
    # data
    "train_data_dir": _to("data_dir", _STR),
    "reg_data_dir": _to("reg_data", _STR),
    "dataset_config": _to("dataset_config", _STR),
    "in_json": _refused("give the metadata JSON as a dataset_config subset's metadata_file", _STR),
    "prior_loss_weight": _to("prior_loss_weight", _FLOAT),
    "resolution": Key(_STR + _INT, _resolution),
    "enable_bucket": _to("buckets", _BOOL),
    "min_bucket_reso": _to("min_bucket_reso", _INT),
    "max_bucket_reso": _to("max_bucket_reso", _INT),
    "bucket_reso_steps": _to("bucket_reso_steps", _INT),
    "bucket_no_upscale": _to("bucket_no_upscale", _BOOL),
    "caption_extension": _to("caption_extension", _STR),
    "caption_extention": _to("caption_extension", _STR),  # sd-scripts' old misspelling, still read
    "shuffle_caption": _to("shuffle_captions", _BOOL),
    "keep_tokens": _to("keep_tokens", _INT),
    "caption_dropout_rate": _to("caption_dropout", _FLOAT),
    "caption_tag_dropout_rate": _to("tag_dropout", _FLOAT),
    "flip_aug": _to("flip", _BOOL),
    "random_crop": Key(_BOOL, _flag("crop", lambda v: "random" if v else "center")),
    "keep_tokens_separator": _refused(_DATASET_TOML, _STR, ""),
    "secondary_separator": _refused(_DATASET_TOML, _STR),
    "enable_wildcard": _refused(_DATASET_TOML, _BOOL, False),
    "caption_prefix": _refused(_DATASET_TOML, _STR),
    "caption_suffix": _refused(_DATASET_TOML, _STR),
    "caption_separator": _refused("separate tags with commas", _STR, ","),
    "caption_dropout_every_n_epochs": _refused("use caption_dropout_rate", _INT, 0),
    "color_aug": _refused("leave colours as they are", _BOOL, False),
    "face_crop_aug_range": _refused("crop faces beforehand", _STR),
    "token_warmup_min": _refused("leave the token warm-up out", _INT, 1),
    "token_warmup_step": _refused("leave the token warm-up out", _FLOAT, 0),
    "resize_interpolation": _refused("images are resized with Lanczos", _STR),
    # kohya weighs the loss by alpha masks whether or not masked_loss is set (train_network.py: `masked_loss or alpha_masks`)
    "alpha_mask": Key(_BOOL, lambda value, config: {"alpha_mask": True, "masked_loss": True} if value else {}),
    "masked_loss": _to("masked_loss", _BOOL),
    "conditioning_data_dir": _to("mask_dir", _STR),
    "dataset_class": _refused("give the images as a folder or a dataset_config", _STR),
    "dataset_repeats": _refused("give repeats as N_name folders or in a dataset_config", _INT, 1),
    "debug_dataset": _refused("it trains nothing", _BOOL, False),
    "cache_latents": _ignored("sdlora caches latents (in memory) unless told otherwise; the same latents", _BOOL),
    "cache_latents_to_disk": Key(_BOOL, _cache),
    "vae_batch_size": _to("vae_batch_size", _INT),
    "cache_info": _ignored("sdlora reads image sizes fast anyway", _BOOL),
    "skip_cache_check": _ignored(_NO_EFFECT, _BOOL),
    "cache_text_encoder_outputs": _ignored("sdlora caches the text embeddings whenever the text encoders are frozen", _BOOL),
    "cache_text_encoder_outputs_to_disk": _ignored("sdlora caches the text embeddings whenever the text encoders are frozen", _BOOL),
    "text_encoder_batch_size": _ignored(_NO_EFFECT, _INT),
    "max_data_loader_n_workers": _ignored("loader threads, " + _NO_EFFECT, _INT),
    "persistent_data_loader_workers": _ignored("loader threads, " + _NO_EFFECT, _BOOL),
    # network
    "network_module": Key(_STR, _network),
    "network_args": Key((list,), lambda v, c: {}),  # read by network_module's converter
    "network_dim": _to("rank", _INT),
    "network_alpha": _to("alpha", _FLOAT),
    # kohya drops the down projection's outputs (networks/lora.py: dropout(lora_down(x))), as sdlora's --network-dropout;
    # sdlora's --dropout is peft's, on the layer's input: another regularizer
    "network_dropout": _to("network_dropout", _FLOAT),
    "network_weights": _to("init_lora", _STR),
    "dim_from_weights": _refused("give network_dim equal to network_weights' rank", _BOOL, False),
    "network_train_unet_only": Key(_BOOL, _flag("train_text_encoder", lambda v: not v)),
    "network_train_text_encoder_only": _refused("sdlora always trains the UNet's LoRA", _BOOL, False),
    "base_weights": _refused("merge them into the model first (sdlora merge)", None),
    "base_weights_multiplier": _refused("merge them into the model first (sdlora merge)", None),
    "scale_weight_norms": Key(_FLOAT, lambda v, c: {"scale_weight_norms": float(v)} if v else {}),  # kohya: 0 or None is off
    # LoRA+: network_args in today's sd-scripts, top-level keys in kohya_ss's JSON
    "loraplus_lr_ratio": Key(_FLOAT, lambda v, c: {"loraplus_lr_ratio": float(v)} if v else {}),
    "loraplus_unet_lr_ratio": Key(_FLOAT, lambda v, c: {"loraplus_unet_lr_ratio": float(v)} if v else {}),
    "loraplus_text_encoder_lr_ratio": Key(_FLOAT, lambda v, c: {"loraplus_text_encoder_lr_ratio": float(v)} if v else {}),
    "training_comment": _ignored("a metadata text, " + _NO_EFFECT, _STR),
    "metadata_title": _ignored("a metadata text, " + _NO_EFFECT, _STR),
    "metadata_author": _ignored("a metadata text, " + _NO_EFFECT, _STR),
    "metadata_description": _ignored("a metadata text, " + _NO_EFFECT, _STR),
    "metadata_license": _ignored("a metadata text, " + _NO_EFFECT, _STR),
    "metadata_tags": _ignored("a metadata text, " + _NO_EFFECT, _STR),
    "no_metadata": _refused("sdlora always writes the kohya metadata", _BOOL, False),
    "fp8_base": _to("fp8_base", _BOOL),
    "fp8_base_unet": _refused("use fp8_base (sdlora stores the text encoders in fp8 too)", _BOOL, False),
    # optimizer and schedule
    "optimizer_type": Key(_STR, _optimizer),
    "optimizer_args": Key((list,), lambda v, c: {}),  # read by optimizer_type's converter
    "use_8bit_adam": Key(_BOOL, lambda v, c: {}),  # read by optimizer_type's converter
    "use_lion_optimizer": Key(_BOOL, lambda v, c: {}),  # read by optimizer_type's converter
    "learning_rate": Key(_FLOAT, lambda v, c: {} if c.get("unet_lr") else {"lr": float(v)}),
    "unet_lr": Key(_FLOAT, lambda v, c: {"lr": float(v)} if v else {}),  # kohya: None or 0 is learning_rate
    "text_encoder_lr": Key(_FLOAT + (list,), _text_encoder_lr),
    "max_grad_norm": _to("max_grad_norm", _FLOAT),
    "lr_scheduler": Key(_STR, _lr_scheduler),
    "lr_warmup_steps": Key(_FLOAT, _lr_warmup),
    "lr_scheduler_num_cycles": _refused("sdlora restarts cosine_with_restarts once (kohya's default)", _INT, 1),
    "lr_scheduler_power": _refused("sdlora's polynomial decay is linear (kohya's default power)", _FLOAT, 1.0),
    "lr_scheduler_type": _refused("use one of the named lr_scheduler values", _STR, ""),
    "lr_scheduler_args": _refused("use one of the named lr_scheduler values", None),
    "lr_decay_steps": _refused("use one of the named lr_scheduler values", _FLOAT, 0),
    "lr_scheduler_timescale": _refused("use one of the named lr_scheduler values", _INT),
    "lr_scheduler_min_lr_ratio": _refused("use one of the named lr_scheduler values", _FLOAT),
    "fused_backward_pass": _refused("it is for full fine-tuning with Adafactor", _BOOL, False),
    "max_train_steps": _to("steps", _INT),
    "max_train_epochs": _to("epochs", _INT),
    "train_batch_size": _to("batch_size", _INT),
    "gradient_accumulation_steps": _to("grad_accum", _INT),
    "seed": _to("seed", _INT),
    # precision and memory
    "mixed_precision": _to("mixed_precision", _STR),
    "full_fp16": _to("full_fp16", _BOOL),
    "full_bf16": _to("full_bf16", _BOOL),
    "gradient_checkpointing": _to("gradient_checkpointing", _BOOL),
    "xformers": _ignored("the attention kernel, " + _NO_EFFECT, _BOOL),
    "sdpa": _ignored("the attention kernel, " + _NO_EFFECT, _BOOL),
    "mem_eff_attn": _ignored("the attention kernel, " + _NO_EFFECT, _BOOL),
    "torch_compile": _to("compile", _BOOL),
    "dynamo_backend": _ignored("sdlora compiles with inductor", _STR),
    "blocks_to_swap": _ignored("memory placement, " + _NO_EFFECT, _INT),
    "cpu_offload_checkpointing": _ignored("memory placement, " + _NO_EFFECT, _BOOL),
    "ddp_timeout": _ignored(_NO_EFFECT, _INT),
    "ddp_gradient_as_bucket_view": _ignored(_NO_EFFECT, _BOOL),
    "ddp_static_graph": _ignored(_NO_EFFECT, _BOOL),
    # objective
    "noise_offset": _to("noise_offset", _FLOAT),
    "multires_noise_iterations": _to("multires_noise_iterations", _INT),
    "multires_noise_discount": _to("multires_noise_discount", _FLOAT),
    "ip_noise_gamma": _to("ip_noise_gamma", _FLOAT),
    "zero_terminal_snr": _to("zero_terminal_snr", _BOOL),
    "min_timestep": _to("min_timestep", _INT),
    "max_timestep": _to("max_timestep", _INT),
    "min_snr_gamma": _to("snr_gamma", _FLOAT),
    "loss_type": _to("loss", _STR),
    "huber_c": _to("huber_c", _FLOAT),
    "huber_schedule": _to("huber_schedule", _STR),
    "huber_scale": _refused("leave it at 1", _FLOAT, 1.0),
    "noise_offset_random_strength": _refused("use a fixed noise_offset", _BOOL, False),
    "ip_noise_gamma_random_strength": _refused("use a fixed ip_noise_gamma", _BOOL, False),
    "adaptive_noise_scale": _refused("use noise_offset alone", _FLOAT),
    "scale_v_pred_loss_like_noise_pred": _refused("use min_snr_gamma", _BOOL, False),
    "v_pred_like_loss": _refused("use min_snr_gamma", _FLOAT),
    "debiased_estimation_loss": _refused("use min_snr_gamma", _BOOL, False),
    "weighted_captions": _refused("write captions without (word:weight)", _BOOL, False),
    # SD3 (sd3_train_network.py: train_util.py's flow-matching options, sd3_train_utils.py's own)
    "weighting_scheme": _sd3(_weighting_scheme, _STR),
    "logit_mean": _sd3("logit_mean", _FLOAT),
    "logit_std": _sd3("logit_std", _FLOAT),
    "mode_scale": _sd3("mode_scale", _FLOAT),
    "training_shift": _to("flow_shift", _FLOAT),
    "t5xxl_max_token_length": _to("t5_max_length", _INT),
    "clip_l_dropout_rate": _to("clip_l_dropout", _FLOAT),
    "clip_g_dropout_rate": _to("clip_g_dropout", _FLOAT),
    "t5_dropout_rate": _to("t5_dropout", _FLOAT),
    "apply_lg_attn_mask": _refused("sdlora encodes SD3's text as StableDiffusion3Pipeline does, without attention masks", _BOOL, False),
    "apply_t5_attn_mask": _refused("sdlora encodes SD3's text as StableDiffusion3Pipeline does, without attention masks", _BOOL, False),
    "clip_l": _refused(_SD3_ENCODER_FILES, _STR),
    "clip_g": _refused(_SD3_ENCODER_FILES, _STR),
    "t5xxl": _refused(_SD3_ENCODER_FILES, _STR),
    "save_clip": _refused("sdlora writes the LoRA only", _BOOL, False),
    "save_t5xxl": _refused("sdlora writes the LoRA only", _BOOL, False),
    "t5xxl_device": _ignored("memory placement, " + _NO_EFFECT, _STR),
    "t5xxl_dtype": _ignored("T5 runs in the run's precision (kohya: does not work yet)", _STR),
    "pos_emb_random_crop_rate": _refused("the positional embeddings' random crop " + _NOT_YET, _FLOAT, 0.0),
    "enable_scaled_pos_embed": _refused("scaled positional embeddings " + _NOT_YET, _BOOL, False),
    # outputs and checkpoints
    "output_dir": _to("output_dir", _STR),
    "output_name": _to("name", _STR),
    "save_model_as": _refused("sdlora writes safetensors", _STR, "safetensors"),
    "use_safetensors": _ignored("sdlora always writes safetensors", _BOOL),
    "save_precision": Key(_STR, _save_precision),
    "save_every_n_steps": _to("checkpoint_every", _INT),
    "save_last_n_steps": Key(_INT, _keep_last),
    "save_state": _ignored("sdlora's checkpoints are always resumable states", _BOOL),
    "save_state_on_train_end": _ignored("sdlora's checkpoints are always resumable states", _BOOL),
    "save_last_n_steps_state": Key(_INT, _keep_last),
    "save_every_n_epochs": Key(_INT, _epoch_saves),
    "save_n_epoch_ratio": _refused(_NO_EPOCH_CADENCE, _INT),
    "save_last_n_epochs": _refused(_NO_EPOCH_CADENCE, _INT),
    "save_last_n_epochs_state": _refused(_NO_EPOCH_CADENCE, _INT),
    "resume": _refused("sdlora cannot resume kohya's saved state; start the run again (or network_weights)", _STR),
    "skip_until_initial_step": _refused("start the run again", _BOOL, False),
    "initial_epoch": _refused("start the run again", _INT),
    "initial_step": _refused("start the run again", _INT),
    # samples, validation, logs
    "sample_prompts": _to("sample_prompts", _STR),
    "sample_prompt_lines": _to("validation_prompts", (list,)),  # kohya_ss's prompt text, one prompt a line
    "sample_every_n_steps": _to("validate_every", _INT),
    "sample_every_n_epochs": _refused(_NO_EPOCH_CADENCE, _INT),
    "sample_sampler": _to("sampler", _STR),
    "sample_at_first": _to("sample_at_first", _BOOL),
    "validation_split": _to("val_split", _FLOAT),
    "validation_seed": _refused("the held-out images are drawn with seed", _INT),
    "validate_every_n_steps": _refused("the held-out loss is measured at each sample_every_n_steps", _INT),
    "validate_every_n_epochs": _refused(_NO_EPOCH_CADENCE, _INT),
    "max_validation_steps": _refused("the whole held-out set is measured", _INT),
    "log_with": _to("report_to", _STR),
    "log_tracker_name": _to("tracker_project", _STR),
    "logging_dir": _ignored("sdlora logs into OUTPUT/logs, " + _NO_EFFECT, _STR),
    "log_prefix": _ignored(_NO_EFFECT, _STR),
    "wandb_run_name": _ignored(_NO_EFFECT, _STR),
    "log_tracker_config": _ignored(_NO_EFFECT, _STR),
    "wandb_api_key": _ignored("log in with wandb login instead; " + _NO_EFFECT, _STR),
    "log_config": _ignored("sdlora writes config.toml beside the LoRA anyway", _BOOL),
    "config_file": _refused("sdlora reads one kohya config", _STR),
    "output_config": _refused("sdlora writes config.toml beside the LoRA; it trains", _BOOL, False),
    "huggingface_repo_id": _refused("upload the files yourself", _STR),
    "huggingface_repo_type": _ignored(_NO_EFFECT, _STR),
    "huggingface_path_in_repo": _ignored(_NO_EFFECT, _STR),
    "huggingface_token": _ignored(_NO_EFFECT, _STR),
    "huggingface_repo_visibility": _ignored(_NO_EFFECT, _STR),
    "save_state_to_huggingface": _refused("upload the files yourself", _BOOL, False),
    "resume_from_huggingface": _refused("upload the files yourself", _BOOL, False),
    "async_upload": _ignored(_NO_EFFECT, _BOOL),
}


# kohya_ss's saved JSON (its lora_gui.py builds the sd-scripts command from it): the GUI's names of sd-scripts' keys
GUI_NAMES = {
    "epoch": "max_train_epochs",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "lora_network_weights": "network_weights",
    "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sdxl_no_half_vae": "no_half_vae",
}
# the GUI's own keys: read below (LoRA_type and its network settings, lr_warmup %, xformers as a choice), or of its
# other tabs and launchers, with no effect on a LoRA run of SD1/SD2/SDXL
GUI_ONLY = (
    "LoRA_type", "LyCORIS_preset", "conv_dim", "conv_alpha", "lr_warmup", "noise_offset_type", "model_list",
    "num_cpu_threads_per_process", "gpu_ids", "multi_gpu", "num_machines", "num_processes", "main_process_port",
    "extra_accelerate_launch_args", "dynamo_mode", "dynamo_use_dynamic", "dynamo_use_fullgraph", "save_as_bool",
    "use_wandb", "additional_parameters", "stop_text_encoder_training", "sample_prompts",
    "factor", "decompose_both", "unit", "use_cp", "constrain", "rescaled", "train_on_input", "bypass_mode", "dora_wd",
    "learning_rate_te", "learning_rate_te1", "learning_rate_te2", "no_token_padding", "mem_eff_save",
    "blockwise_fused_optimizers", "fused_optimizer_groups", "metadata_author", "metadata_description",
    "metadata_license", "metadata_tags", "metadata_title",
)  # fmt: skip
# the GUI's keys of its FLUX and SD3 tabs: used only when their checkbox is on
_OTHER_MODELS = ("flux1_", "sd3_", "t5xxl", "clip_l", "clip_g", "ae", "guidance_scale", "discrete_flow_shift",
                 "model_prediction_type", "timestep_sampling", "split_mode", "train_blocks", "double_blocks_to_swap",
                 "single_blocks_to_swap", "save_clip", "save_t5xxl", "apply_t5_attn_mask", "logit_mean", "logit_std",
                 "mode_scale", "weighting_scheme", "flux_fused_backward_pass")  # fmt: skip
# the GUI's SD3 tab (used when sd3_checkbox is on): its sd3_ names of sd-scripts' keys, and the keys it keeps as they are
_GUI_SD3_NAMES = {
    "sd3_clip_l": "clip_l", "sd3_t5xxl": "t5xxl", "sd3_clip_l_dropout_rate": "clip_l_dropout_rate",
    "sd3_t5_dropout_rate": "t5_dropout_rate", "sd3_text_encoder_batch_size": "text_encoder_batch_size",
    "sd3_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sd3_cache_text_encoder_outputs_to_disk": "cache_text_encoder_outputs_to_disk",
    "sd3_enable_scaled_pos_embed": "enable_scaled_pos_embed", "sd3_fused_backward_pass": "fused_backward_pass",
    "sd3_disable_mmap_load_safetensors": "disable_mmap_load_safetensors",
}  # fmt: skip
_GUI_SD3_KEYS = ("clip_l", "clip_g", "t5xxl", "clip_g_dropout_rate", "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype",
                 "t5xxl_max_token_length", "apply_t5_attn_mask", "logit_mean", "logit_std", "mode_scale", "weighting_scheme")  # fmt: skip
# the network settings lora_gui.py passes as network_args when set, for its LoRA types (_network reads networks.lora's)
_GUI_NETWORK_ARGS = {
    "networks.lora": ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                      "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout"),
    "lycoris.kohya": ("rank_dropout", "module_dropout", "use_tucker", "use_scalar", "rank_dropout_scale", "train_norm",
                      "dora_wd"),
}  # fmt: skip
_GUI_LYCORIS = {"LyCORIS/LoCon": "locon", "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr"}  # LoRA_type -> LyCORIS's algo
_GUI_LOKR_ARGS = ("factor", "decompose_both", "use_cp")  # what lora_gui.py adds for LyCORIS/LoKr alone
_GUI_KEPT_AT_ZERO = ("max_grad_norm",)  # where the GUI's 0 is a value (no clipping), not "unset"


def _gui_to_kohya(data: dict[str, Any]) -> dict[str, Any]:
    """kohya_ss's JSON as sd-scripts' keys, as its lora_gui.py passes them: empty, zero and false values are the
    GUI's "not set" (it passes no flag for them), numbers it saved as text are numbers, its names renamed, its
    LoRA_type turned into network_module and network_args."""
    if data.get("flux1_checkbox"):
        raise UserError("kohya_ss config: FLUX training is not supported by sdlora (flux1_checkbox)")
    sd3 = bool(data.get("sd3_checkbox"))
    for key in list(data):
        if sd3 and key in _GUI_SD3_NAMES:
            data[_GUI_SD3_NAMES[key]] = data.pop(key)
        elif (key.startswith(_OTHER_MODELS) and not (sd3 and key in _GUI_SD3_KEYS)) or key in ("flux1_checkbox", "sd3_checkbox"):
            data.pop(key)
    data = {key: _gui_number(value) for key, value in data.items()}
    data = {key: value for key, value in data.items() if value not in ("", None, False, 0) or key in _GUI_KEPT_AT_ZERO}
    config: dict[str, Any] = {}
    lora_type = data.get("LoRA_type", "Standard")
    if sd3 and lora_type != "Standard":
        raise UserError(f"kohya_ss config: LoRA_type = {lora_type!r} with sd3_checkbox {_NOT_YET}: sdlora trains SD3's Standard LoRA")
    if sd3:  # lora_gui.py runs sd3_train_network.py with networks.lora_sd3
        module, args = "networks.lora_sd3", []
    elif lora_type in ("Standard", "Kohya LoCon"):
        module, args = "networks.lora", []
    elif lora_type in _GUI_LYCORIS:
        module, args = "lycoris.kohya", [f"algo={_GUI_LYCORIS[lora_type]}", f"preset={data.get('LyCORIS_preset', 'full')}"]
        if lora_type == "LyCORIS/LoKr":
            args += [f"{key}={data.pop(key)}" for key in _GUI_LOKR_ARGS if key in data]
    else:
        raise UserError(
            f"kohya_ss config: LoRA_type = {lora_type!r} {_NOT_YET}: sdlora trains Standard, Kohya LoCon, LyCORIS/LoCon, "
            "LyCORIS/LoHa and LyCORIS/LoKr"
        )
    if lora_type != "Standard":
        args += [f"conv_dim={data.get('conv_dim', 1)}", f"conv_alpha={data.get('conv_alpha', 1)}"]
    args += [f"{key}={data.pop(key)}" for key in _GUI_NETWORK_ARGS.get(module, ()) if key in data]
    config |= {"network_module": module, "network_args": args}
    if data.get("lr_warmup"):  # a percentage of the steps
        config["lr_warmup_steps"] = data["lr_warmup"] / 100
    if data.get("noise_offset_type", "Original") == "Original":
        data.pop("multires_noise_iterations", None), data.pop("multires_noise_discount", None)
    else:
        data.pop("noise_offset", None)
    if data.get("use_wandb"):
        config["log_with"] = "wandb"
    if isinstance(data.get("optimizer_args"), str):  # the GUI's one text of key=value pairs
        config["optimizer_args"] = [data.pop("optimizer_args")]
    if isinstance(data.get("network_args"), str):
        config["network_args"] += data.pop("network_args").split()
    prompts = data.get("sample_prompts")  # the GUI's prompt text, which it writes to a file for sd-scripts
    if prompts:
        if " --" in prompts:
            raise UserError("kohya_ss config: sample_prompts with --options: save them as a prompt file and give its path")
        config["sample_prompt_lines"] = [line.strip() for line in prompts.splitlines() if line.strip()]
    for key, zero in (("additional_parameters", ""), ("stop_text_encoder_training", 0)):
        if data.get(key, zero) != zero:
            raise UserError(f"kohya_ss config: {key} = {data[key]!r} is not carried out by sdlora; leave it empty")
    attention = data.get("xformers", "none")
    if attention not in ("xformers", "sdpa", "none", True):
        raise UserError(f"kohya_ss config: xformers = {attention!r} must be xformers, sdpa or none")
    data.pop("xformers", None)
    for key, value in data.items():
        if key not in GUI_ONLY:
            config[GUI_NAMES.get(key, key)] = value
    return config


def _gui_number(value: Any) -> Any:
    """A number the GUI saved as text ("1234", "0.5") as the number; any other value as it is."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# ---------------------------------------------------------------- reading a file


@dataclass(frozen=True)
class KohyaConfig:
    """sdlora's options from a kohya config, and the keys ignored as having no effect."""

    path: Path
    options: Options
    ignored: tuple[str, ...]

    def command_line(self) -> str:
        """The equivalent `sdlora train ...`."""
        return command_line(self.options)


def read_kohya_config(path: str | Path) -> KohyaConfig:
    """sd-scripts' `--config_file` TOML (its tables are flattened, as sd-scripts' read_config_from_file does) or
    kohya_ss's saved JSON, as sdlora's flat options over kohya's defaults. Relative paths stay relative to the
    current folder, as kohya reads them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"kohya config not found: {path}") from err
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise UserError(f"{path}: a kohya_ss config is a JSON object of settings")
        config = _gui_to_kohya(data)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path} is not valid TOML: {err}") from err
        config = {}
        for key, value in data.items():  # sd-scripts flattens its tables ([model_arguments], ...) into one namespace
            for inner, inner_value in value.items() if isinstance(value, dict) else [(key, value)]:
                if inner in config:
                    raise UserError(f"{path}: {inner} is given twice")
                config[inner] = inner_value
    try:
        options, ignored = kohya_options(config)
    except UserError as err:
        raise UserError(f"{path}: {str(err).removeprefix('kohya config: ').removeprefix('kohya_ss config: ')}") from None
    return KohyaConfig(path, options, ignored)


def kohya_options(config: dict[str, Any]) -> tuple[Options, tuple[str, ...]]:
    """(sdlora's options, the ignored keys) from sd-scripts' keys and values."""
    options = dict(KOHYA_DEFAULTS)
    sd3 = is_sd3_config(config)
    if sd3:  # sd3_train_network.py's defaults; SD3 has no prediction type to choose
        options.pop("prediction_type")
        options |= KOHYA_SD3_DEFAULTS
    ignored = []
    for key, value in config.items():
        rule = KEYS.get(key)
        if rule is None:
            raise UserError(f"kohya config: unknown key {key!r} (not an sd-scripts training argument sdlora knows)")
        if rule.types is not None and not _fits(rule.types, value):
            names = " or ".join(sorted({t.__name__ for t in rule.types}))
            raise UserError(f"kohya config: {key} = {value!r} must be {names.replace('str', 'a string').replace('list', 'a list')}")
        if rule.sd3 and sd3:
            options |= {rule.to: float(value)} if isinstance(rule.to, str) else rule.to(value, config)
        elif rule.ignored:
            ignored.append(key)
        elif rule.refused:
            if value not in (rule.default, None, "") and not (value is False and rule.default is None):
                raise UserError(f"kohya config: {key} = {value!r} is not carried out by sdlora: {rule.refused}")
        elif isinstance(rule.to, str):
            choices = SECTIONS[SECTION_OF[rule.to]].__dataclass_fields__[rule.to].metadata["choices"]
            if choices and value not in choices:
                raise UserError(f"kohya config: {key} = {value!r} is not carried out by sdlora: it takes {', '.join(choices)}")
            options[rule.to] = float(value) if rule.types == _FLOAT else value
        else:
            options |= rule.to(value, config)
    for key in ("network_module", "optimizer_type"):  # their converters read the keys beside them; run them once
        if key not in config:
            options |= KEYS[key].to({"network_module": "networks.lora", "optimizer_type": ""}[key], config)
    if "text_encoder_lr" not in config:  # kohya: the text encoders train at learning_rate (not unet_lr)
        options["text_encoder_lr"] = float(config.get("learning_rate", KOHYA_DEFAULTS["lr"]))
    if "train_data_dir" in config and "dataset_config" in config:
        options.pop("data_dir")  # kohya: dataset_config wins; its subsets name their folders
    return options, tuple(ignored)


def _fits(types: tuple[type, ...], value: Any) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, list):  # sd-scripts' lists: network_args and optimizer_args of texts, text_encoder_lr of numbers
        return list in types and all(isinstance(item, str if str in types or types == (list,) else (int, float)) for item in value)
    return isinstance(value, types)


# ---------------------------------------------------------------- the equivalent command line


def command_line(options: Options) -> str:
    """`sdlora train ...` with these flat options: DATA_DIR first, then each option as its flag."""
    words = ["sdlora", "train"]
    if options.get("data_dir"):
        words.append(shlex.quote(options["data_dir"]))
    for name, value in options.items():
        if name == "data_dir" or value is None:
            continue
        flag = "--output" if name == "output_dir" else "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            if value:
                words += [flag, *(shlex.quote(str(item)) for item in value)]
        else:
            words += [flag, shlex.quote(f"{value:g}" if isinstance(value, float) else str(value))]
    return " ".join(words)
