"""The optimizers `--optimizer` chooses from, by name, and `--optimizer-args key=value` for their constructors.

Each entry of `OPTIMIZERS` names the class (imported only when that optimizer is chosen: the packages are
optional extras), what to pip install when it is missing, and the constructor arguments people use with it for
LoRA training, each with where that practice comes from. `--lr` and `--weight-decay` are always passed (the
learning rate of each trained part rides on its parameter group); `--optimizer-args` go on top of the defaults.

`check_optimizer` runs at the start of training, before the model loads: it imports the class, refuses argument
names its constructor does not take or values of the wrong kind, and takes one step on a dummy parameter, so a
value the optimizer refuses (or a bitsandbytes that cannot run here) fails in one line before minutes of loading.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError

__all__ = [
    "OPTIMIZERS",
    "Fp32MasterWeights",
    "OptimizerSpec",
    "build_optimizer",
    "device_optimizer_args",
    "check_optimizer",
    "optimizer_class",
    "optimizer_label",
    "parse_optimizer_args",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: `module.attribute`, the pip package and sdlora extra that install it, its LoRA defaults."""

    module: str
    attribute: str
    package: str | None  # None: comes with a dependency of sdlora (torch, transformers)
    extra: str | None  # the sdlora extra that installs `package`
    defaults: dict[str, Any] = field(default_factory=dict)  # constructor arguments before --optimizer-args
    needs_gpu: bool = False  # its step runs CUDA kernels: the trial step runs on the training device

    @property
    def install_hint(self) -> str:
        return f'pip install "sdlora[{self.extra}]" (or pip install {self.package})'


OPTIMIZERS: dict[str, OptimizerSpec] = {
    # torch's AdamW with torch's betas (0.9, 0.999) and eps 1e-8: what sdlora always used, and diffusers'
    # train_text_to_image_lora.py and kohya's default (AdamW) too
    "adamw": OptimizerSpec("torch.optim", "AdamW", None, None),
    # 8-bit AdamW states, about a quarter of the optimizer memory: kohya's AdamW8bit and diffusers' --use_8bit_adam
    # both pass the AdamW settings unchanged (bitsandbytes' own defaults are AdamW's); it needs a CUDA GPU
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "adamw8bit", needs_gpu=True),
    # Prodigy finds its own step size; --lr multiplies it and stays 1.0. The Prodigy README ("Diffusion models"):
    # safeguard_warmup=True, use_bias_correction=True, weight_decay=0.01 (sdlora's --weight-decay default); diffusers'
    # DreamBooth LoRA scripts default their --prodigy_* flags the same, and kohya users pass them with d_coef (1.0 is
    # Prodigy's own; below 1 damps the step, e.g. 2 speeds it up) through --optimizer_args
    "prodigy": OptimizerSpec(
        "prodigyopt", "Prodigy", "prodigyopt", "prodigy", {"d_coef": 1.0, "use_bias_correction": True, "safeguard_warmup": True}
    ),
    # Adafactor at a fixed learning rate: the combination transformers' Adafactor docstring and kohya's README
    # give for an explicit lr (relative_step=True would ignore --lr; pass relative_step=True to get it anyway)
    "adafactor": OptimizerSpec(
        "transformers.optimization",
        "Adafactor",
        None,
        None,
        {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    ),
    # lion-pytorch's Lion with its defaults (betas (0.9, 0.99)); its README quotes the paper: an lr 3-10x lower than
    # AdamW's and a weight decay 3-10x higher. Both stay the user's --lr and --weight-decay (kohya passes them as given)
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch", "lion"),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
# what --optimizer-args must not set: the parameters themselves, and the learning rate, which --lr and the
# per-part --text-encoder-lr set on each parameter group (a constructor lr would be overridden by them)
_RESERVED = {"params": "the parameters are the LoRA's", "lr": "use --lr (and --text-encoder-lr) instead"}
# a new key=value starts where whitespace is followed by a name and "=": "d_coef=2 betas=(0.9, 0.99)" is two items
_ITEM_START = re.compile(r"\s+(?=[A-Za-z_]\w*\s*=)")
# lower-case spellings people write (TOML's true/false); `inf` (not a Python literal) for Prodigy's growth_rate
_LOWER_LITERALS = {"true": True, "false": False, "none": None, "inf": math.inf}


def parse_optimizer_args(items: Sequence[str]) -> dict[str, Any]:
    """`["d_coef=2", "betas=(0.9,0.99)"]` -> `{"d_coef": 2, "betas": (0.9, 0.99)}`; values are Python literals.

    A value is read with `ast.literal_eval` (never eval): numbers, True/False (true/false too), None, tuples
    (`(0.9,0.99)` or kohya's `0.9,0.99`), quoted strings, and `inf`. One item may hold several space-separated pairs. Raises a
    one-line ValueError for an item that is not `key=value`, a key given twice, or a value that is not a literal.
    """
    if isinstance(items, str) or not all(isinstance(item, str) for item in items):
        raise UserError(f"--optimizer-args must be a list of key=value texts, got {items!r}")
    parsed: dict[str, Any] = {}
    for item in (part for entry in items for part in _ITEM_START.split(entry.strip()) if part):
        key, equals, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not equals or not key.isidentifier() or not text:
            raise UserError(f"--optimizer-args {item!r} is not key=value (e.g. d_coef=2 or betas=(0.9,0.99))")
        if key in parsed:
            raise UserError(f"--optimizer-args {key} is given twice")
        parsed[key] = _literal(key, text)
    return parsed


def _literal(key: str, text: str) -> Any:
    if text.lower() in _LOWER_LITERALS:
        return _LOWER_LITERALS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise UserError(
            f"--optimizer-args {key}={text}: {text!r} is not a Python literal (a number, True/False, None, a tuple like (0.9,0.99) or a quoted string like 'text')"
        ) from None


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class `name` stands for, imported now; a one-line ValueError when its package is missing or broken."""
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r} is invalid: it must be one of {', '.join(OPTIMIZER_NAMES)}")
    spec = OPTIMIZERS[name]
    try:
        module = importlib.import_module(spec.module)  # only now: the packages are optional and slow to import
    except ModuleNotFoundError as err:
        top = spec.module.split(".")[0]
        if spec.package is None or (err.name or "").split(".")[0] != top:
            raise UserError(f"--optimizer {name}: cannot import {spec.module} ({_first_line(err)})") from err
        raise UserError(f"--optimizer {name}: {spec.package} is not installed: {spec.install_hint}") from err
    except Exception as err:  # bitsandbytes without its CUDA libraries raises RuntimeError, OSError... on import
        raise UserError(
            f"--optimizer {name}: {spec.package or spec.module} is installed but cannot be used here ({_first_line(err)})"
        ) from err
    try:
        return getattr(module, spec.attribute)
    except AttributeError as err:
        raise UserError(
            f"--optimizer {name}: {spec.module} has no {spec.attribute}: {spec.install_hint if spec.package else 'upgrade it'}"
        ) from err


def _accepted(cls: type) -> dict[str, inspect.Parameter] | None:
    """The constructor's keyword parameters other than `params`, or None when it takes **kwargs (any name goes)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
    return {n: p for n, p in list(parameters.items())[1:] if n != "params" and p.kind not in skip}


def _check_args(name: str, cls: type, args: dict[str, Any]) -> None:
    accepted = _accepted(cls)
    for key, value in args.items():
        if key in _RESERVED:
            raise UserError(f"--optimizer-args {key}: not an optimizer argument here: {_RESERVED[key]}")
        if accepted is None:
            continue
        if key not in accepted:
            names = ", ".join(n for n in accepted if n not in _RESERVED)
            raise UserError(f"--optimizer-args {key}: {cls.__name__} (--optimizer {name}) takes no argument {key!r}; it takes {names}")
        default = accepted[key].default
        expected = _kind_of(default)
        if expected and not _is_kind(value, expected):
            raise UserError(f"--optimizer-args {key}={value!r}: {cls.__name__}'s {key} must be {expected} (its default is {default!r})")
        if isinstance(default, tuple) and not _same_shape(value, default):  # torch's AdamW indexes betas[1] unchecked
            numbers = all(_kind_of(item) == "a number" for item in default)
            raise UserError(
                f"--optimizer-args {key}={value!r}: {cls.__name__}'s {key} must be a tuple of {len(default)} "
                f"{'numbers' if numbers else 'values'} like its default {default!r}"
            )


def _kind_of(default: Any) -> str | None:
    """What a value must be, judged by the constructor's default; None when the default says nothing (None, a tensor)."""
    if isinstance(default, bool):
        return "True or False"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, tuple):
        return "a tuple like (0.9, 0.99)"
    if isinstance(default, str):
        return "a quoted string"
    return None


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "True or False":
        return isinstance(value, bool)
    if kind == "a number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("a tuple"):
        return isinstance(value, (tuple, list))
    return isinstance(value, str)


def _same_shape(value: tuple | list, default: tuple) -> bool:
    """As many items as the default tuple, each of its item's kind (where the item says one)."""
    if len(value) != len(default):
        return False
    kinds = (_kind_of(item) for item in default)
    return all(kind is None or _is_kind(item, kind) for item, kind in zip(value, kinds))


def _constructor_args(name: str, lr: float, weight_decay: float, args: dict[str, Any]) -> dict[str, Any]:
    """lr, weight decay, the table's defaults, then --optimizer-args (which may override weight_decay, as in kohya)."""
    merged = {"lr": lr, "weight_decay": weight_decay, **OPTIMIZERS[name].defaults, **args}
    if name == "adafactor" and merged.get("relative_step"):
        merged["lr"] = None  # Adafactor's relative steps take no lr (it refuses one); the groups' lr go unused
    return merged


# the optimizers whose fused CUDA kernel (one launch for every parameter's update instead of several per tensor) takes
# the same arguments and computes the same update, up to the order of floating-point operations
FUSED_ON_CUDA = ("adamw",)


def device_optimizer_args(name: str, args: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """`args` with the device's fast path added: `fused=True` for torch's AdamW on CUDA, unless --optimizer-args
    chose `fused` or `foreach` itself. On other devices `args` unchanged (torch picks foreach where it has it)."""
    if torch.device(device).type != "cuda" or name not in FUSED_ON_CUDA or {"fused", "foreach"} & set(args):
        return args
    return {**args, "fused": True}


def build_optimizer(
    name: str, param_groups: Iterable[dict[str, Any]], lr: float, weight_decay: float, args: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (each with its own "lr"), with `lr` and `weight_decay` as the defaults.

    `args` are constructor arguments on top of the table's defaults (from `parse_optimizer_args`). Errors a user
    can fix (a missing package, an argument the constructor does not take) are one-line ValueErrors.
    `build_optimizer("adamw", groups, lr, wd)` is exactly `torch.optim.AdamW(groups, lr=lr, weight_decay=wd)`.
    """
    args = dict(args or {})
    cls = optimizer_class(name)
    _check_args(name, cls, args)
    param_groups = list(param_groups)
    if name == "prodigy":
        # Prodigy raises at its first step when parameter groups have different (non-zero) learning rates
        lrs = sorted({group.get("lr", lr) for group in param_groups} - {0.0})
        if len(lrs) > 1:
            raise UserError(
                f"--optimizer prodigy takes one learning rate for every trained part, got {', '.join(f'{x:g}' for x in lrs)}: pass --text-encoder-lr equal to --lr"
            )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints a notice about its weight decay
            return cls(param_groups, **_constructor_args(name, lr, weight_decay, args))
    except (ValueError, TypeError, AssertionError) as err:  # the constructor's own checks (lion-pytorch asserts)
        given = " ".join(f"{k}={v!r}" for k, v in args.items())
        raise UserError(f"--optimizer {name}{' --optimizer-args ' + given if given else ''}: {_first_line(err)}") from err


class Fp32MasterWeights(torch.optim.Optimizer):
    """Steps fp16 parameters (--full-fp16) through an optimizer that works on fp32 copies of them.

    In fp16, torch AdamW's eps 1e-8 rounds to 0 and squared gradients under ~2e-4 underflow to 0, so LoRA A's first
    gradient (exactly 0, B starts at 0) makes its update 0/0 = NaN. A representable eps would not help: where the
    squared gradient underflowed, the step becomes gradient/eps, thousands of times too large. So the optimizer state
    and the weights it updates are fp32 (mixed precision's master weights; LoRA weights are a few MB, their fp32
    copies cost little), and the fp16 parameters the model computes with are rounded from them after each step.
    kohya's --full_fp16 (experimental there) only lifts the GradScaler's fp16 check (patch_accelerator_for_fp16_training)
    and leaves a torch optimizer's state in fp16. This optimizer's own groups hold the fp16 parameters, so a GradScaler unscales and checks
    their gradients, and an lr scheduler sets their lr, which each step hands to the inner optimizer."""

    def __init__(self, param_groups: Iterable[dict[str, Any]], build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        param_groups = [dict(group, params=list(group["params"])) for group in param_groups]
        master_groups = [
            dict(group, params=[torch.nn.Parameter(p.detach().to(torch.float32), requires_grad=True) for p in group["params"]])
            for group in param_groups
        ]  # fmt: skip
        self.inner = build(master_groups)
        super().__init__(param_groups, defaults={})
        self._sync_groups(self.inner.param_groups, self.param_groups)  # the inner optimizer's defaults, for schedulers

    @staticmethod
    def _sync_groups(sources: list[dict[str, Any]], targets: list[dict[str, Any]], keys: Iterable[str] | None = None) -> None:
        for source, target in zip(sources, targets):
            target.update({key: source[key] for key in (keys or source) if key != "params"})

    def _pairs(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for group, master_group in zip(self.param_groups, self.inner.param_groups):
            yield from zip(group["params"], master_group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the inner optimizer on the fp32 copies (gradients cast up), then the fp16 weights rounded from them."""
        if closure is not None:
            raise ValueError("Fp32MasterWeights takes no closure")
        self._sync_groups(self.param_groups, self.inner.param_groups, keys=("lr",))  # the scheduler's lr
        for param, master in self._pairs():
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
        self.inner.step()
        for param, master in self._pairs():
            param.copy_(master)
            master.grad = None
        self._sync_groups(self.inner.param_groups, self.param_groups)  # what the optimizer itself changes (Prodigy's d)
        return None

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, and the fp32 weights under "fp32_master_weights"."""
        return {**self.inner.state_dict(), "fp32_master_weights": [master.detach() for _, master in self._pairs()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("fp32_master_weights", None)
        self.inner.load_state_dict(state_dict)
        with torch.no_grad():
            for index, (param, master) in enumerate(self._pairs()):
                master.copy_(param if masters is None else masters[index])  # a state without them: from the weights
        self._sync_groups(self.inner.param_groups, self.param_groups)


def check_optimizer(name: str, lr: float, weight_decay: float, args: dict[str, Any]) -> None:
    """Refuse now, in one line, what `build_optimizer` or the first step would refuse later: a missing or unusable
    package, an unknown or ill-typed argument, a value the optimizer rejects. Warns about a learning rate far
    from the optimizer's usual one. Takes one step on a dummy parameter (on the GPU for GPU-only optimizers)."""
    spec = OPTIMIZERS.get(name)
    device = torch.device("cpu")
    if spec is not None and spec.needs_gpu and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # this process's GPU, as accelerate picks
    # 4096 elements: bitsandbytes keeps smaller tensors in 32 bits, and the trial must exercise its 8-bit kernels
    dummy = torch.nn.Parameter(torch.linspace(-1, 1, 4096, device=device))
    with warnings.catch_warnings():  # what the constructor warns about, the real build says again
        warnings.simplefilter("ignore")
        optimizer = build_optimizer(name, [{"params": [dummy], "lr": lr}], lr, weight_decay, args)
        try:
            dummy.grad = torch.ones_like(dummy)
            optimizer.step()
            if not torch.isfinite(dummy).all():
                raise UserError("the step made the weights non-finite")
        except Exception as err:  # bitsandbytes without a usable GPU fails here, as do values the step cannot use
            given = " ".join(f"{k}={v!r}" for k, v in args.items())
            where = " (bitsandbytes' 8-bit optimizers need a CUDA GPU)" if spec.needs_gpu else ""
            raise UserError(
                f"--optimizer {name}{' --optimizer-args ' + given if given else ''} cannot train here{where}: {_first_line(err)}"
            ) from err
    if name == "prodigy" and lr <= 0.1:
        warnings.warn(
            f"--optimizer prodigy with --lr {lr:g}: Prodigy finds the step size itself and --lr scales it; the usual value is 1.0",
            stacklevel=2,
        )
    if name == "adafactor" and _constructor_args(name, lr, weight_decay, args)["lr"] is None:
        warnings.warn("--optimizer adafactor with relative_step=True: Adafactor picks its own step size and --lr is ignored", stacklevel=2)


def optimizer_label(name: str, args: dict[str, Any] | None = None) -> str:
    """kohya's `ss_optimizer` spelling: `module.Class(key=value,...)` with the arguments beyond lr and weight decay
    (the table's defaults and --optimizer-args), e.g. `torch.optim.AdamW` or `prodigyopt.Prodigy(d_coef=2,...)`."""
    spec = OPTIMIZERS[name]
    given = {**spec.defaults, **(args or {})}
    given.pop("weight_decay", None)
    listed = ",".join(f"{key}={value}" for key, value in given.items())
    return f"{spec.module}.{spec.attribute}" + (f"({listed})" if listed else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
