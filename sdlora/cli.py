"""`sdlora` command line: parses arguments and calls the library; user errors become one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
# errors a user can fix; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, OSError, KeyError)


# ---------------------------------------------------------------- tiny-model


def _tiny_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder to write the pipeline to (replaced if it exists)")
    parser.add_argument("--variant", choices=("tiny", "sd15-shaped"), default="tiny", help="tiny: 64 px test model (8 MB); sd15-shaped: real SD1.5 UNet/VAE shapes, random weights (3.6 GB, for benchmarks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def _tiny_model_run(args: argparse.Namespace) -> None:
    from .models import write_tiny_model

    out = write_tiny_model(args.out_dir, variant=args.variant, seed=args.seed)
    print(f"wrote {args.variant} pipeline to {out}")


# ---------------------------------------------------------------- convert


def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA file in any supported format (detected from its keys)")
    parser.add_argument("output", help="file to write (.safetensors)")
    parser.add_argument("--to", choices=("diffusers", "kohya"), required=True, help="diffusers: for load_lora_weights; kohya: for A1111, ComfyUI and kohya's sd-scripts")
    parser.add_argument("--from", dest="from_format", default=None, help="input format, when detection should be overridden (diffusers, kohya, kohya-ldm, diffusers-old, diffusers-attn-procs, peft)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="cast the LoRA weights (default: keep)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow reading a pickle .bin/.ckpt file (weights only)")


def _convert_run(args: argparse.Namespace) -> None:
    from .lorafile import read_lora, write_lora
    from .models import parse_dtype

    state = read_lora(args.input, allow_pickle=args.allow_pickle, fmt=args.from_format)
    if args.dtype:
        state = state.to(parse_dtype(args.dtype))
    out = write_lora(state, args.output, args.to)
    print(f"wrote {len(state)} modules as {args.to} to {out}")


# ---------------------------------------------------------------- inspect


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="LoRA file in any supported format")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.add_argument("--allow-pickle", action="store_true", help="allow reading a pickle .bin/.ckpt file (weights only)")


def _inspect_run(args: argparse.Namespace) -> None:
    from .describe import describe, format_description, to_json
    from .lorafile import read_lora

    info = describe(read_lora(args.file, allow_pickle=args.allow_pickle), args.file)
    print(to_json(info) if args.json else format_description(info))


# ---------------------------------------------------------------- registry

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: list[Command] = [
    ("convert", "convert a LoRA file between formats", _convert_args, _convert_run),
    ("inspect", "show a LoRA file's format, ranks, alphas, architecture and metadata", _inspect_args, _inspect_run),
    ("tiny-model", "write a tiny random-weight Stable Diffusion pipeline (offline tests and examples)", _tiny_model_args, _tiny_model_run),
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to generate the README's CLI reference)."""
    parser = argparse.ArgumentParser(prog="sdlora", description="Train, convert, load and merge LoRA adapters for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _quiet_libraries() -> None:
    """Keep library chatter (deprecations, torchvision notices) off a user's terminal."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sdlora` console script."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sdlora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
