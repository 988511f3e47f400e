"""`sdlora` command line: parses arguments and calls the library; errors become one line on stderr.

A UserError (sdlora's own checks) or an OSError (a missing file, a permission, a full disk) is the user's to fix:
one line, exit 2. Any other exception is unexpected (a bug, or a library failing in a way sdlora did not foresee):
one line that says so, exit 1; `--debug` or SDLORA_DEBUG=1 lets every error through with its traceback.

Each command imports the library parts it runs when it runs (the imports inside the `_*_run` functions), so
`sdlora --help` and argument errors answer before diffusers' seconds of import time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from .config import add_arguments, config_from_args
from .core.version import __version__
from .errors import UserError
from .models.loading import (
    ALLOW_PICKLE_HELP,
    DTYPES,
    MODEL_CONFIG_HELP,
    MODEL_HELP,
    load_pipeline,
    parse_dtype,
    write_tiny_model,
)

EXIT_USER_ERROR = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
# errors a user can fix: sdlora's own checks, and the user's files and disk (missing, not allowed, full)
USER_ERRORS = (UserError, OSError)
DEBUG_ENV = "SDLORA_DEBUG"
DEBUG_HINT = f"run with --debug (or {DEBUG_ENV}=1) for the traceback"


# ---------------------------------------------------------------- options several commands share


def _model_options(parser: argparse.ArgumentParser, purpose: str, *, default: str | None = None, required: bool = False) -> None:
    """--model (`purpose`, then what a model may be) and --model-config."""
    help_text = f"{purpose}: {MODEL_HELP}" + (f" (default: {default})" if default else "")
    parser.add_argument("--model", default=default, required=required, help=help_text)
    _model_config(parser)


def _model_config(parser: argparse.ArgumentParser) -> None:
    """--model-config (train's name for it too), and its old spelling --config: hidden from --help, it still works."""
    parser.add_argument("--model-config", default=None, metavar="FOLDER", help=MODEL_CONFIG_HELP)
    parser.add_argument("--config", dest="model_config", action=_RenamedOption, help=argparse.SUPPRESS)


class _RenamedOption(argparse.Action):
    """An option's old spelling: it sets the new one's value and warns, in one line, what to use."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        new = "--" + self.dest.replace("_", "-")
        sys.stderr.write(_one_line_warning(f"{option_string} is now {new}", UserWarning, "", 0))


def _allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


def _dtype(parser: argparse.ArgumentParser, help_text: str, *, flag: str = "--dtype", default: str | None = None) -> None:
    """A dtype option (its meaning and default are the command's); the choices are those parse_dtype reads."""
    parser.add_argument(flag, choices=tuple(DTYPES), default=default, help=help_text)


def _device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 or mps (default: auto)")


# ---------------------------------------------------------------- train


def _train_args(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def _train_run(args: argparse.Namespace) -> None:
    from .training.recipe import train  # lazy: see the module docstring

    config = config_from_args(args)
    path = train(config)
    if path is None:
        print("dry run: the memory plan above; nothing was cached, trained or written")
        return
    print(f"wrote {path} and {path.parent}")


# ---------------------------------------------------------------- tiny-model


def _tiny_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="new or empty folder to write the pipeline to (one sdlora wrote is replaced; any other is refused)")
    parser.add_argument(
        "--variant",
        choices=("tiny", "demo", "sd15-shaped", "sdxl", "sdxl-shaped", "sd3", "sd3-shaped"),
        default="tiny",
        help="tiny: 64 px SD1-architecture test model (8 MB); demo: the pretrained 64 px demo model that draws simple scenes, "
        "copied from the package (what --model demo loads; --seed does not apply); sd15-shaped: real SD1.5 UNet/VAE shapes, random weights (3.6 GB, "
        "for benchmarks); sdxl: 64 px SDXL-architecture test model (what --model tiny-sdxl builds); sdxl-shaped: real SDXL "
        "UNet/VAE shapes (bf16, 5 GB, for benchmarks); sd3: 64 px SD3-architecture test model (what --model tiny-sd3 builds: "
        "three joint blocks, the first with SD3.5 Medium's attn2, CLIP-L 32, CLIP-G 48 and T5 96 wide); sd3-shaped: SD3.5 Medium's "
        "transformer and SD3's VAE, text encoders of SD3's widths cut to 2 layers (bf16, 6 GB, for benchmarks)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def _tiny_model_run(args: argparse.Namespace) -> None:
    out = write_tiny_model(args.out_dir, variant=args.variant, seed=args.seed)
    print(f"wrote {args.variant} pipeline to {out}")


# ---------------------------------------------------------------- convert


def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA file in any supported format (detected from its keys)")
    parser.add_argument("output", help="file to write (.safetensors)")
    parser.add_argument(
        "--to",
        choices=("diffusers", "kohya"),
        required=True,
        help="diffusers: for load_lora_weights; kohya: for A1111, ComfyUI and kohya's sd-scripts",
    )
    parser.add_argument(
        "--from",
        dest="from_format",
        default=None,
        help="input format, when detection should be overridden (diffusers, kohya, kohya-ldm, diffusers-old, diffusers-attn-procs, peft)",
    )
    _dtype(parser, "cast the LoRA weights (default: keep)")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="write plain LoRA modules of at most this rank: LoHa, LoKr, DoRA, OFT... as the SVD of their update, "
        "LoRA modules of a higher rank reduced (needed for --to diffusers when the file holds other kinds)",
    )
    parser.add_argument("--conv-rank", type=int, default=None, help="the rank for 3x3 convs (default: --rank)")
    _model_options(parser, "the model the LoRA is for (the updates of DoRA, OFT, BOFT, IA3 and GLoRA depend on its weights)")
    _allow_pickle(parser)


def _convert_run(args: argparse.Namespace) -> None:
    from .core.files import read_lora, write_lora  # lazy: see the module docstring

    _check_output_file(args.output, [args.input, args.model, args.model_config], "output")
    state = read_lora(args.input, allow_pickle=args.allow_pickle, fmt=args.from_format)
    _check_ranks(args.rank, args.conv_rank)
    if args.rank is not None or args.conv_rank is not None or args.model is not None:
        from .tools.rerank import model_weights, to_plain_lora  # lazy: see the module docstring

        weights = None
        if args.model is not None:
            weights = model_weights(state, args.model, config=args.model_config, allow_pickle=args.allow_pickle, label=args.input)
        state, report = to_plain_lora(state, args.rank, args.conv_rank, weights, label=args.input)
        _print_report(report)
    if args.dtype:
        state = state.to(parse_dtype(args.dtype))
    out = write_lora(state, args.output, args.to)
    print(f"wrote {len(state)} modules as {args.to} to {out}")


def _check_output_file(out: str, inputs: list, option: str = "--out") -> None:
    """The one output rule (storage.output_rules) for a file, before any input is read."""
    from .storage.output_rules import check_output_file  # lazy: see the module docstring

    check_output_file(out, inputs, option)


def _check_ranks(*ranks: int | None) -> None:
    if any(rank is not None and rank < 1 for rank in ranks):
        raise UserError("--rank and --conv-rank must be at least 1")


def _print_report(report) -> None:
    for line in report.lines():
        print(line)


def _out_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        choices=("kohya", "diffusers"),
        default="kohya",
        help="kohya (default): for A1111, ComfyUI and kohya's sd-scripts; diffusers: for load_lora_weights",
    )
    _dtype(parser, "dtype of the file written (default: fp32)")


def _write(state, args: argparse.Namespace, family=None) -> None:
    from .core.files import write_lora  # lazy: see the module docstring

    if args.dtype:
        state = state.to(parse_dtype(args.dtype))
    out = write_lora(state, args.out, args.to, family=family)
    print(f"wrote {len(state)} modules as {args.to} to {out}")


# ---------------------------------------------------------------- extract, resize, combine


def _extract_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help=f"the model that was fine-tuned: {MODEL_HELP}")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model, of the same architecture")
    parser.add_argument("--rank", type=int, required=True, help="rank of each module (attention, feed-forward, text encoders)")
    parser.add_argument(
        "--conv-rank", type=int, default=None, help="also extract the resnets' and down/upsamplers' layers, 3x3 convs at this rank (LoCon)"
    )
    parser.add_argument(
        "--clamp-quantile",
        type=float,
        default=0.99,
        help="clamp the factors to this quantile of their magnitudes, as kohya's extract does (1: no clamping)",
    )
    parser.add_argument(
        "--min-diff",
        type=float,
        default=0.01,
        help="a text encoder whose weights differ by at most this anywhere counts as not fine-tuned and is left out",
    )
    parser.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    _out_format(parser)
    _dtype(
        parser,
        "dtype the two models load in (default fp32: half precision rounds small differences away)",
        flag="--load-dtype",
        default="fp32",
    )
    _model_config(parser)
    _allow_pickle(parser)


def _extract_run(args: argparse.Namespace) -> None:
    from .tools.extract import extract_lora  # lazy: see the module docstring

    _check_output_file(args.out, [args.base, args.tuned, args.model_config])
    state, report, family = extract_lora(
        args.base, args.tuned, args.rank, conv_rank=args.conv_rank, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
        config=args.model_config, allow_pickle=args.allow_pickle, dtype=parse_dtype(args.load_dtype),
    )  # fmt: skip
    _print_report(report)
    _write(state, args, family)


def _resize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="LoRA file in any supported format (LoRA modules; convert other kinds first)")
    parser.add_argument("--rank", type=int, default=None, help="the new rank (with --dynamic: the highest rank kept)")
    parser.add_argument(
        "--dynamic",
        default=None,
        metavar="METHOD:VALUE",
        help="a rank per module from its singular values, as kohya's resize_lora.py: sv_ratio:R (keep those above the "
        "largest / R), sv_fro:F (keep a share F of the Frobenius norm), sv_cumulative:C (a share C of their sum)",
    )
    parser.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    _out_format(parser)
    _allow_pickle(parser)


def _resize_run(args: argparse.Namespace) -> None:
    from .core.files import read_lora  # lazy: see the module docstring
    from .tools.rerank import resize_lora

    _check_ranks(args.rank)
    _check_output_file(args.out, [args.file])
    dynamic = _parse_dynamic(args.dynamic) if args.dynamic else None
    state, report = resize_lora(read_lora(args.file, allow_pickle=args.allow_pickle), args.rank, dynamic, label=args.file)
    _print_report(report)
    _write(state, args)


def _parse_dynamic(text: str) -> tuple[str, float]:
    from .core.lowrank import DYNAMIC_METHODS, check_dynamic  # lazy: see the module docstring

    method, sep, value = text.partition(":")
    if method not in DYNAMIC_METHODS or not sep:
        raise UserError(f"--dynamic {text}: use METHOD:VALUE with METHOD one of {', '.join(DYNAMIC_METHODS)}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--dynamic {text}: {value!r} is not a number") from None
    try:
        check_dynamic(method, number)
    except ValueError as err:
        raise UserError(f"--dynamic {text}: {err}") from None
    return method, number


def _combine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files, each at a weight (default 1)")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="the SVD of the weighted sum at this rank (any additive kind); without it the modules are joined side by side, exactly (rank: the sum)",
    )
    parser.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    _out_format(parser)
    _allow_pickle(parser)


def _combine_run(args: argparse.Namespace) -> None:
    from .core.files import read_lora  # lazy: see the module docstring
    from .inference.merge import parse_lora_arg
    from .tools.rerank import combine_loras

    _check_ranks(args.rank)
    _check_output_file(args.out, [parse_lora_arg(text)[0] for text in args.loras])
    loras = []
    for text in args.loras:
        path, weight = parse_lora_arg(text)
        loras.append((path, read_lora(path, allow_pickle=args.allow_pickle), weight))
    state, report = combine_loras(loras, args.rank)
    if report is not None:
        _print_report(report)
    else:
        print(f"joined exactly: {len(state)} modules, ranks {'/'.join(str(r) for r in state.ranks())}")
    _write(state, args)


# ---------------------------------------------------------------- inspect


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="LoRA file in any supported format")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    _allow_pickle(parser)


def _inspect_run(args: argparse.Namespace) -> None:
    from .core.files import read_lora  # lazy: see the module docstring
    from .core.inspection import describe, format_description, to_json

    info = describe(read_lora(args.file, allow_pickle=args.allow_pickle), args.file)
    print(to_json(info) if args.json else format_description(info))


# ---------------------------------------------------------------- generate


def _image_args(parser: argparse.ArgumentParser, command_args: Callable[[argparse.ArgumentParser], None], out_help: str) -> None:
    """The options generate and grid share, around the command's own options (`command_args`), in --help's order."""
    _model_options(parser, "the model to draw with", default="tiny")
    command_args(parser)
    parser.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    parser.add_argument("--out", required=True, help=out_help)
    _dtype(parser, "model dtype (default: fp32 on CPU, fp16 on GPU)")
    _device(parser)
    _allow_pickle(parser)


def _generate_args(parser: argparse.ArgumentParser) -> None:
    _image_args(parser, _generate_own_args, out_help="folder for NNNNN-<seed>.png files and grid.png (images are added, never replaced)")


def _generate_own_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA file in any supported format, with its weight (default 1); repeat for several",
    )
    parser.add_argument(
        "--lora-dir",
        default=None,
        help="folder (searched with its subfolders) where the prompt's <lora:NAME:WEIGHT> tags find their files, by file stem",
    )
    parser.add_argument(
        "--prompt", required=True, help="text prompt; <lora:NAME:WEIGHT> tags in it load LoRAs from --lora-dir, as in A1111"
    )
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    _sampler_arg(parser)
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the first image; image i uses seed + i (default: random, recorded in each PNG)"
    )
    parser.add_argument("--num-images", type=int, default=1, help="how many images")


def _sampler_arg(parser: argparse.ArgumentParser, several: bool = False) -> None:
    from .inference.samplers import SAMPLERS  # the table is plain data: no torch or diffusers import

    parser.add_argument(
        "--sampler",
        default=None,
        help=("comma-separated samplers (an axis when several); " if several else "")
        + f"an A1111 name ({', '.join(SAMPLERS)}), a kohya name (euler_a, k_dpm_2...) or a diffusers scheduler class; default: the model's scheduler",
    )


def _open_loras(args: argparse.Namespace, prompt_tags) -> list:
    """(LoraFile, scale) for each --lora, then each <lora:...> tag of the prompt, every file read before the model loads."""
    from .core.files import open_lora  # lazy: see the module docstring
    from .inference.merge import parse_lora_arg

    specs = [parse_lora_arg(text) for text in args.lora] + [(path, weight) for path, weight, _ in prompt_tags]
    return [(open_lora(path, allow_pickle=args.allow_pickle), scale) for path, scale in specs]


def _load_model(args: argparse.Namespace):
    from .inference.generation import default_dtype, resolve_device  # lazy: see the module docstring

    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    return load_pipeline(args.model, dtype=dtype, config=args.model_config, allow_pickle=args.allow_pickle).to(device)


def _loading_loras(command: str):
    """A context in which a LoRA that matches only part of the model warns in one line naming the command."""
    from .inference.adapters import LoraMatchWarning  # lazy: see the module docstring

    @contextlib.contextmanager
    def context():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LoraMatchWarning)
            yield
        for warning in caught:
            if issubclass(warning.category, LoraMatchWarning):
                print(f"sdlora {command}: warning: {warning.message}", file=sys.stderr)
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)

    return context()


def _generate_run(args: argparse.Namespace) -> None:
    from .inference.adapters import load_lora  # lazy: see the module docstring
    from .inference.generation import GRID_NAME, check_guidance, check_image_output, check_image_size, generate, model_label, save_images
    from .inference.prompts import prompt_loras
    from .inference.samplers import find_sampler

    # every check a user can fail comes before the model loads and before anything is written
    check_image_size(args.height, "--height")
    check_image_size(args.width, "--width")
    check_guidance(args.guidance, "--guidance")
    check_image_output(args.out, [args.model, args.model_config])
    if args.sampler is not None:
        find_sampler(args.sampler)
    prompt, tags = prompt_loras(args.prompt, args.lora_dir)
    loras = _open_loras(args, tags)
    pipe = _load_model(args)
    with _loading_loras("generate"):
        for lora, scale in loras:
            load_lora(pipe, lora, scale=scale)
    images = generate(
        pipe, prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
        num_images=args.num_images, height=args.height, width=args.width, model_name=model_label(args.model),
        sampler=args.sampler,
    )  # fmt: skip
    paths = save_images(images, args.out)
    print(
        f"wrote {len(images)} images and {GRID_NAME} to {args.out} (seeds {images[0].info['seed']}..{images[-1].info['seed']}): {', '.join(p.name for p in paths)}"
    )


# ---------------------------------------------------------------- grid


def _grid_args(parser: argparse.ArgumentParser) -> None:
    _image_args(parser, _grid_own_args, out_help="folder for grid.png (labelled) and each cell as NNNNN-<seed>.png with its parameters")


def _grid_own_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-steps",
        nargs="+",
        default=[],
        metavar="PATH",
        help="the checkpoint axis: LoRA files, or a training run's folder / its checkpoints folder (each step-* checkpoint's LoRA, in step order)",
    )
    parser.add_argument("--weights", default="1", help="comma-separated weights of the --lora-steps LoRA (default 1), e.g. 0,0.4,0.8,1.2")
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt; repeat for a prompt axis; <lora:NAME:WEIGHT> tags load LoRAs from --lora-dir in the cells of that prompt",
    )
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (every cell)")
    parser.add_argument("--seed", default="0", help="comma-separated seeds (default 0); every cell of a row and column uses the same one")
    parser.add_argument("--steps", default="20", help="comma-separated denoising steps (default 20)")
    parser.add_argument("--guidance", default="7.5", help="comma-separated guidance scales (default 7.5)")
    _sampler_arg(parser, several=True)
    parser.add_argument(
        "--x",
        default=None,
        help="the axis along X: weight, checkpoint, prompt, seed, sampler, steps, guidance (default: the first with several values)",
    )
    parser.add_argument("--y", default=None, help="the axis along Y (default: the next with several values)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA in every cell, beside the checkpoint; repeat for several",
    )
    parser.add_argument("--lora-dir", default=None, help="folder where the prompts' <lora:NAME:WEIGHT> tags find their files, by stem")


def _values(text: str, flag: str, kind: type) -> list:
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise UserError(f"{flag} {text!r}: the axis has no values; give one or more, separated by commas")
    try:
        values = [kind(item) for item in items if item]
    except ValueError:
        raise UserError(f"{flag} {text!r}: each value must be {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not all(math.isfinite(value) for value in values):
        raise UserError(f"{flag} {text!r}: each value must be a finite number (not inf or nan)")
    return values


def _grid_run(args: argparse.Namespace) -> None:
    from .inference.generation import (  # lazy: see the module docstring
        GRID_NAME,
        check_image_output,
        check_image_size,
        model_label,
        png_info,
        save_images,
    )
    from .inference.grid import GridSpec, find_checkpoints, make_grid, resolve_prompts
    from .inference.merge import parse_lora_arg
    from .storage.atomic import atomic_file

    check_image_size(args.height, "--height")
    check_image_size(args.width, "--width")
    out = check_image_output(args.out, [args.model, args.model_config])
    weights = _values(args.weights, "--weights", float)
    seeds = _values(args.seed, "--seed", int)
    if any(not 0 <= s < 2**63 for s in seeds):
        raise UserError(f"--seed {args.seed!r}: seeds must be between 0 and 2**63")
    samplers = [None] if args.sampler is None else [s.strip() for s in args.sampler.split(",") if s.strip()]
    if not samplers:
        raise UserError(f"--sampler {args.sampler!r}: the axis has no values")
    spec = GridSpec(
        prompts=args.prompt, weights=weights, checkpoints=find_checkpoints(args.lora_steps), seeds=seeds, samplers=samplers,
        steps=_values(args.steps, "--steps", int), guidance=_values(args.guidance, "--guidance", float),
        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        loras=[parse_lora_arg(text) for text in args.lora], lora_dir=args.lora_dir, x=args.x, y=args.y,
    )  # fmt: skip
    spec.check()
    prompts = resolve_prompts(spec)  # a tag naming no file fails before the model loads
    pipe = _load_model(args)
    with _loading_loras("grid"):
        grid = make_grid(pipe, spec, model_name=model_label(args.model), resolved_prompts=prompts)
    paths = save_images([image for row in grid.cells for image in row], out, grid=False)
    with atomic_file(out / GRID_NAME) as tmp:
        grid.image.save(tmp, format="PNG", pnginfo=png_info(None))
    rows = f" x {len(grid.y_labels)} {grid.y}" if grid.y else ""
    print(f"wrote {out / GRID_NAME} ({len(grid.x_labels)} {grid.x}{rows}) and {len(paths)} images to {out}")


# ---------------------------------------------------------------- merge / unmerge


def _merge_args(parser: argparse.ArgumentParser) -> None:
    _model_options(parser, "the model to merge into", required=True)
    parser.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="FILE[:SCALE]",
        help="LoRA file in any supported format, with its scale (default 1); repeat for several",
    )
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument(
        "--out",
        default=None,
        help="new or empty folder to write the merged pipeline to (one sdlora wrote is replaced; any other is refused)",
    )
    output.add_argument(
        "--single-file",
        default=None,
        metavar="OUT.safetensors",
        help="write a single-file checkpoint instead (needs a single-file .safetensors --model)",
    )
    _dtype(parser, "dtype of every floating tensor written (default: keep); updates are computed in fp32")
    _allow_pickle(parser)


def _merge_run(args: argparse.Namespace, unmerge: bool = False) -> None:
    from .inference.merge import MergeStats, merge_model, parse_lora_arg  # lazy: see the module docstring

    loras = [parse_lora_arg(text) for text in args.lora]
    stats = MergeStats()
    out = merge_model(
        args.model, loras, out_dir=args.out, dtype=args.dtype, single_file=args.single_file, unmerge=unmerge,
        allow_pickle=args.allow_pickle, config=args.model_config, stats=stats,
    )  # fmt: skip
    verb = "unmerged" if unmerge else "merged"
    print(
        f"{verb} {stats.modules} LoRA modules into {stats.tensors} weights of {out} (update arithmetic {stats.arithmetic_s:.2f} s over {stats.bytes_touched / 1e9:.3f} GB)"
    )


def _unmerge_args(parser: argparse.ArgumentParser) -> None:
    _merge_args(parser)


def _unmerge_run(args: argparse.Namespace) -> None:
    _merge_run(args, unmerge=True)


# ---------------------------------------------------------------- ui


def _ui_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        "--listen",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only); any other needs --auth, and is reachable from other machines",
    )
    parser.add_argument("--port", type=int, default=7861, help="port (default: 7861; 0: a free one, printed)")
    parser.add_argument(
        "--root",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder the UI may read and write (datasets, models, runs); repeat for several; every other path is refused (default: the current folder)",
    )
    parser.add_argument(
        "--auth", default=None, metavar="USER:PASS", help="HTTP basic auth on every page and call (needed with --host other than 127.0.0.1)"
    )
    parser.add_argument("--parallel", type=int, default=1, help="trainings run at once; the others wait in the queue (default: 1)")
    parser.add_argument(
        "--state",
        default=None,
        metavar="DIR",
        help="folder of the jobs' table (jobs.sqlite) and folders (default: .sdlora-ui in the first --root); a UI started on it again finds its jobs",
    )


def _ui_run(args: argparse.Namespace) -> None:
    from .ui.server import make_server, serve  # lazy: see the module docstring

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is invalid: it must be from 0 to 65535")
    serve(make_server(args.host, args.port, args.root, args.state, args.auth, args.parallel))


# ---------------------------------------------------------------- registry

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: list[Command] = [
    ("train", "train a LoRA on a folder of images with captions", _train_args, _train_run),
    ("convert", "convert a LoRA file between formats, or any adapter kind to a plain LoRA (--rank)", _convert_args, _convert_run),
    ("generate", "generate images with LoRAs; PNGs record prompt, seed, steps and LoRAs as A1111 does", _generate_args, _generate_run),
    (
        "grid",
        "an X/Y comparison grid: LoRA weights, checkpoints, prompts, seeds, samplers or steps on two axes, labelled",
        _grid_args,
        _grid_run,
    ),
    ("inspect", "show a LoRA file's format, ranks, alphas, architecture and metadata", _inspect_args, _inspect_run),
    ("merge", "merge LoRAs into a model's weights (W + scale * alpha/r * up @ down) and write the model", _merge_args, _merge_run),
    (
        "tiny-model",
        "write a built-in Stable Diffusion pipeline: a tiny random-weight one or the pretrained demo (offline tests and examples)",
        _tiny_model_args,
        _tiny_model_run,
    ),
    ("extract", "extract a LoRA from a fine-tuned model: the SVD of (tuned - base) per layer", _extract_args, _extract_run),
    ("resize", "change a LoRA's rank by SVD (a fixed rank, or per module from its singular values)", _resize_args, _resize_run),
    ("combine", "combine several LoRAs into one file, exactly or by SVD at a rank", _combine_args, _combine_run),
    ("unmerge", "undo a merge: the same arguments as merge, with every scale negated (merge with -SCALE)", _unmerge_args, _unmerge_run),
    (
        "ui",
        "a local web page: train with a form built from the training options, watch jobs learn, inspect, convert, merge",
        _ui_args,
        _ui_run,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to generate the documentation site's CLI and training-options references)."""
    parser = argparse.ArgumentParser(prog="sdlora", description="Train, convert, load and merge LoRA adapters for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"let an error through with its traceback instead of one line (also after the command, or {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_command_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_command_arguments(sub)
        # `sdlora CMD ... --debug` too; SUPPRESS: not given after the command, it leaves `sdlora --debug CMD` as it is
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(run=run)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (deprecations, torchvision notices) off a user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.load|IProgress).*")
    # torchsde's Brownian tree under DPM++ SDE, on float rounding of the first sigma: harmless
    warnings.filterwarnings("ignore", message="Should have ta>=t0")
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`sdlora: warning: ...` on one line, instead of Python's file:line and source-line form."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    return f"sdlora: warning: {text}\n"


def _debugging(args: argparse.Namespace) -> bool:
    """--debug, or SDLORA_DEBUG set to anything but empty, 0, false or no."""
    return args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(err: Exception) -> str:
    """The first line of an error; an OSError as `reason: file` without Python's `[Errno N]` prefix."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        if err.filename and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
    else:
        text = str(err).strip() or type(err).__name__
    return text.strip().splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sdlora` console script: 0 done, 2 a user error, 1 an unexpected error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    debug = _debugging(args)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        if isinstance(err, USER_ERRORS):
            print(f"sdlora {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
        detail = f"{type(err).__name__}: {_one_line(err)}" if str(err).strip() else type(err).__name__
        print(f"sdlora {args.command}: unexpected error: {detail}; {DEBUG_HINT}", file=sys.stderr)
        return EXIT_UNEXPECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
