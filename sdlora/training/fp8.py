"""`--fp8-base`: the frozen Linear and Conv2d weights kept as float8_e4m3fn and cast up to the compute dtype in each call.

kohya's `--fp8_base` casts the whole model to fp8 and leaves the upcast to CUDA autocast; ComfyUI's "manual cast"
layers cast their weight to the input's dtype in forward. Here each layer casts its own weight to the run's compute
dtype (bf16/fp16, or fp32 without mixed precision), so it works on the CPU too (which has fp8 storage, no fp8
matmul), and the backward saves the fp8 weight rather than the upcast copy: the compute-dtype copy of a layer lives
only while that layer runs, forward or backward. Biases, norms and embeddings keep the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

FP8 = getattr(torch, "float8_e4m3fn", None)  # torch 2.1+
FP8_MAX = 448.0  # e4m3fn's largest finite value; larger weights saturate to it


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8; only the input's gradient is computed (W and b are frozen)."""

    @staticmethod
    def forward(ctx, input, weight, bias, dtype):  # noqa: A002 - autograd's names
        ctx.save_for_backward(weight)  # the fp8 weight: backward casts it up again instead of keeping the copy
        ctx.dtype, ctx.input_dtype = dtype, input.dtype
        return F.linear(input, weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.to(ctx.dtype).matmul(weight.to(ctx.dtype)).to(ctx.input_dtype)
        return grad_input, None, None, None


class _UpcastConv2d(torch.autograd.Function):
    """conv2d(x, W) + b with W stored in fp8 and zero padding given as numbers; only the input's gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, dtype, stride, padding, dilation, groups):  # noqa: A002
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.input_dtype, ctx.input_shape = dtype, input.dtype, input.shape
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(input, weight.to(dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_output = grad_output.to(ctx.dtype)
            grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(ctx.dtype), grad_output, *ctx.geometry)
            grad_input = grad_input.to(ctx.input_dtype)
        return grad_input, None, None, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is fp8, cast to `compute_dtype` in each call (peft reads `compute_dtype`
    as the dtype to give a LoRA on this layer, as it does for bitsandbytes' layers)."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if self.weight.dtype != FP8:  # a layer built from this class with weights of its own (as peft does for convs)
            return super().forward(input)
        return _UpcastLinear.apply(input, self.weight, self.bias, self.compute_dtype)


class Fp8Conv2d(nn.Conv2d):
    """An nn.Conv2d whose frozen weight is fp8, cast to `compute_dtype` in each call."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if self.weight.dtype != FP8:  # peft builds a conv's LoRA layers as type(base layer): those are plain convs
            return super().forward(input)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            # layouts no Stable Diffusion layer has: the plain path, whose backward keeps the upcast copy
            return self._conv_forward(input, self.weight.to(self.compute_dtype), self.bias)
        return _UpcastConv2d.apply(input, self.weight, self.bias, self.compute_dtype, self.stride, self.padding, self.dilation, self.groups)


_FP8_LAYERS = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}  # exact types: a subclass may have a forward of its own


@torch.no_grad()
def store_weights_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Turn every plain nn.Linear and nn.Conv2d of the frozen `model` into its fp8 layer in place (weight as
    float8_e4m3fn, cast to `compute_dtype` per call; bias untouched); return the names of the weights stored."""
    if FP8 is None:
        raise UserError(f"--fp8-base needs torch 2.1 or later (this is {torch.__version__}): upgrade torch or leave it off")
    stored = []
    for name, module in model.named_modules():
        fp8_class = _FP8_LAYERS.get(type(module))
        if fp8_class is None:
            continue
        if module.weight.requires_grad:
            raise RuntimeError(f"{name}: fp8 storage is for frozen weights only")
        module.weight = nn.Parameter(module.weight.clamp(-FP8_MAX, FP8_MAX).to(FP8), requires_grad=False)
        module.__class__ = fp8_class
        module.compute_dtype = compute_dtype
        stored.append(f"{name}.weight")
    # DDP broadcasts every parameter of the model it wraps, and gloo has no float8: the frozen weights are the same on
    # every process already. peft's LoRA later wraps a layer as <name>.base_layer, so both spellings are listed.
    wrapped = [name.removesuffix(".weight") + ".base_layer.weight" for name in stored]
    ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", [])
    model._ddp_params_and_buffers_to_ignore = [*ignored, *stored, *wrapped]
    return stored


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of `model`'s Linear and Conv2d layers that do not train (LoRA's own layers aside)."""
    return sum(
        module.weight.nelement() * module.weight.element_size()
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.requires_grad
    )
