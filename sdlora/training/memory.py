"""The memory plan: how much accelerator memory each phase of a run will hold at its peak, printed before the
caches fill on an accelerator (and alone, with `--dry-run`, anywhere), so a 12 GB card's owner knows before waiting
for an out-of-memory error.

Three phases, each the sum of what is resident then and the peak of what it computes:
- setup: the VAE and text encoders that fill the caches, and one VAE encode of `--vae-batch-size` images at the
  largest bucket (the UNet is not on the accelerator yet);
- the training step: the UNet's frozen weights (fp8 where `--fp8-base` stored them), the LoRA weights, their gradients
  and optimizer state (by optimizer), the parts the step still needs (the VAE without a latent cache, text encoders
  that train or encode captions each step), and the activations of one forward and backward at the largest bucket
  and batch;
- sampling: every part of the pipeline, the LoRA and the optimizer state, and the larger of the UNet's
  classifier-free-guidance forward and the VAE decode (in tiles where `--sample-vae-tiling` tiles).

Weights are counted from the loaded model's parameters and dtypes. Activations are not guessed from a formula: the
model itself runs forward and backward on the meta device (shapes and dtypes, no data, about a second for SDXL) with
every parameter swapped for a meta copy, and each tensor it creates is counted from creation to release; so
gradient checkpointing, the LoRA layers, fp8 upcasts and the attention layout count as they are. Attention is
counted as the fused kernels hold it (flash / memory-efficient on CUDA, flash on CPUs: output and log-sum-exp, no
tokens x tokens matrix). Not counted: the CUDA context and the caching allocator's slack (torch's
`max_memory_allocated` leaves them out too; nvidia-smi shows some hundreds of MB more).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .validation import decoding_in_tiles

GIB = 2**30
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}
# optimizer state per trained parameter, in units of the parameter's own bytes (adafactor: see _optimizer_bytes)
STATE_PER_PARAMETER = {"adamw": 2.0, "lion": 1.0, "prodigy": 4.0}  # AdamW: exp_avg, exp_avg_sq; Prodigy: + s, p0
STATE_BYTES_PER_ELEMENT = {"adamw8bit": 2.0}  # bitsandbytes: two uint8 states (plus block-wise scales, negligible)


@dataclass
class Phase:
    name: str
    parts: dict[str, int] = field(default_factory=dict)  # bytes by what holds them

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    device: torch.device
    phases: list[Phase]
    shape: str  # what the activations were counted for: "1024x1024, batch 1, checkpointing on"
    capacity: int | None = None  # the accelerator's memory, where torch can tell

    @property
    def peak(self) -> int:
        return max(phase.total for phase in self.phases)

    def phase(self, name: str) -> Phase:
        return next(phase for phase in self.phases if phase.name == name)

    def table(self) -> str:
        unit, name = (GIB, "GiB") if self.peak >= GIB else (2**20, "MiB")
        where = f"{self.device}" + (f", {self.capacity / GIB:.1f} GiB" if self.capacity else "")
        lines = [f"memory plan ({where}; {self.shape}), in {name}:"]
        width = max(len(phase.name) for phase in self.phases)
        for phase in self.phases:
            parts = ", ".join(f"{part} {size / unit:.2f}" for part, size in phase.parts.items() if size >= unit / 200)
            lines.append(f"  {phase.name:<{width}}  {phase.total / unit:7.2f}  ({parts})")
        if self.capacity and self.peak > 0.95 * self.capacity:
            lines.append(
                f"  the peak ({self.peak / GIB:.1f} GiB) will not fit in {self.capacity / GIB:.1f} GiB: try --gradient-checkpointing, "
                "--fp8-base, a smaller --batch-size or --resolution, --no-samples or --sample-vae-tiling on"
            )
        return "\n".join(lines)


def module_bytes(module: nn.Module, trainable: bool | None = None) -> int:
    """Bytes of `module`'s parameters and buffers (only the trained or the frozen parameters when `trainable` says)."""
    total = sum(p.nelement() * p.element_size() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
    if trainable is not True:
        total += sum(b.nelement() * b.element_size() for b in module.buffers())
    return total


def optimizer_bytes(optimizer: str, params: list[torch.Tensor], fp32_master: bool = False) -> int:
    """The optimizer's state for `params`; `fp32_master`: --full-fp16's fp32 copy of the weights (and fp32 state)."""
    total = 0
    for p in params:
        element = 4 if fp32_master else p.element_size()
        if optimizer in STATE_PER_PARAMETER:
            total += int(STATE_PER_PARAMETER[optimizer] * p.nelement() * element)
        elif optimizer in STATE_BYTES_PER_ELEMENT:
            total += int(STATE_BYTES_PER_ELEMENT[optimizer] * p.nelement())
        elif optimizer == "adafactor":  # factored second moment: a row and a column vector per matrix, no first moment
            total += (sum(p.shape[:2]) if p.ndim >= 2 else p.nelement()) * element
        else:
            total += 2 * p.nelement() * element  # an optimizer this table does not know: as AdamW
        if fp32_master:
            total += p.nelement() * 4
    return total


# ---------------------------------------------------------------- counting what a computation allocates


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an operation creates until the last tensor on it is released; `peak` is the
    most held at once. Storages that existed before are not counted (the weights and inputs: counted separately).
    A storage counts as held while any Python tensor on it lives (a view too: matmul returns its result through
    `_unsafe_view` and drops the original); tensors autograd saves are kept as Python objects by `counting`."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        inputs = None
        for schema, tensor in zip(func._schema.returns, results):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            if key not in self.storages:
                if schema.alias_info is not None:  # a view of, or an in-place change to, something not counted
                    continue
                if inputs is None:  # a view whose schema does not say so (_unsafe_view) of something not counted
                    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
                    inputs = {leaf.untyped_storage()._cdata for leaf in leaves if isinstance(leaf, torch.Tensor)}
                if key in inputs:
                    continue
                size = tensor.untyped_storage().nbytes()
                self.storages[key] = [size, 0]
                self.live += size
                self.peak = max(self.peak, self.live)
            self.storages[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as flash / memory-efficient kernels hold it: the output, and for backward the
    inputs, the output and a float32 log-sum-exp per query; on the meta device, so nothing is computed."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def on_meta(*modules: nn.Module, dtype_of_trained: torch.dtype | None = None) -> Iterator[None]:
    """Every parameter and buffer of `modules` swapped for a meta tensor of its shape, dtype and requires_grad (trained
    ones in `dtype_of_trained`: the dtype mixed precision computes them in), and attention counted as fused kernels
    hold it; everything restored on exit, whatever happens."""
    swapped: list[tuple[dict, str, object]] = []
    copies: dict[int, torch.Tensor] = {}  # shared weights stay shared

    def meta(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) not in copies:
            dtype = dtype_of_trained if parameter and tensor.requires_grad and dtype_of_trained else tensor.dtype
            copy = torch.empty(tensor.shape, dtype=dtype, device="meta")
            copies[id(tensor)] = nn.Parameter(copy, requires_grad=tensor.requires_grad) if parameter else copy
        return copies[id(tensor)]

    attention = torch.nn.functional.scaled_dot_product_attention
    try:
        for module in modules:
            for sub in module.modules():
                for table, parameter in ((sub._parameters, True), (sub._buffers, False)):
                    for name, tensor in list(table.items()):
                        if tensor is not None:
                            swapped.append((table, name, tensor))
                            table[name] = meta(tensor, parameter)
        torch.nn.functional.scaled_dot_product_attention = _fused_attention
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = attention
        for table, name, tensor in reversed(swapped):
            table[name] = tensor


@contextlib.contextmanager
def counting() -> Iterator[LiveBytes]:
    """Count allocations; tensors saved for backward stay counted until backward releases them."""
    live = LiveBytes()
    # saved tensors held by their Python objects: a saved tensor is released exactly when autograd releases it
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), live:
        yield live


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------- the plan of a training run


def plan_memory(
    config, model, size: tuple[int, int], batch: int, device: torch.device, latents_cached: bool, captions_cached: bool
) -> MemoryPlan:
    """The plan of the run `config` describes, on `model` as loaded and with its LoRA added (before anything is
    cached or prepared): the largest bucket `size` (width, height) and `batch` images per step on `device`;
    `latents_cached`: the VAE leaves the accelerator after setup; `captions_cached`: every caption is cached, so the
    frozen text encoders leave it too."""
    data, samples, base = config.data, config.samples, config.base
    pipe, unet = model.pipe, model.unet
    denoiser = "transformer" if model.flow_matching else "UNet"  # SD3's MMDiT, or the UNet
    on_cpu = torch.device(device).type == "cpu"  # one memory: whatever is "offloaded" stays in it
    trained = [p for part in (unet, *model.text_encoders.values()) for p in part.parameters() if p.requires_grad]
    lora = sum(p.nelement() * p.element_size() for p in trained)
    weights = {denoiser: module_bytes(unet, trainable=False), "VAE": module_bytes(pipe.vae)}
    weights["text encoders"] = sum(module_bytes(encoder, trainable=False) for encoder in model.text_encoders.values())
    state = optimizer_bytes(config.optimization.optimizer, trained, fp32_master=base.full_fp16)
    compute = model.dtype if base.mixed_precision != "no" else None  # what autocast computes trained weights in

    phases = []
    if latents_cached or captions_cached:
        setup = Phase("setup (caching)")
        if latents_cached or on_cpu:
            setup.parts["VAE"] = weights["VAE"]
        setup.parts["text encoders"] = weights["text encoders"]
        if on_cpu:
            setup.parts[denoiser] = weights[denoiser] + lora
        if latents_cached:
            setup.parts["VAE encode"] = _vae_encode_peak(pipe.vae, data.vae_batch_size, size)
        phases.append(setup)

    step = Phase("training step")
    step.parts[denoiser] = weights[denoiser]
    step.parts["LoRA + gradients"] = 2 * lora
    step.parts[f"{config.optimization.optimizer} state"] = state
    if not latents_cached or on_cpu:
        step.parts["VAE"] = weights["VAE"]
    if not captions_cached or on_cpu:
        step.parts["text encoders"] = weights["text encoders"]
    step.parts["activations"] = _step_peak(model, size, batch, compute)
    phases.append(step)

    if samples.samples:
        sampling = Phase("sampling")
        sampling.parts.update({name: weights[name] for name in (denoiser, "VAE", "text encoders")})
        sampling.parts["LoRA"] = lora
        sampling.parts[f"{config.optimization.optimizer} state"] = state
        resolution = data.resolution or size[0]
        with decoding_in_tiles(pipe.vae, samples.sample_vae_tiling, resolution, resolution):
            decode = _vae_decode_peak(pipe.vae, (resolution, resolution))
        sampling.parts["denoise / decode"] = max(_sample_peak(model, (resolution, resolution)), decode)
        phases.append(sampling)

    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    capacity = torch.cuda.get_device_properties(device).total_memory if on_cuda else None
    checkpointing = "on" if base.gradient_checkpointing else "off"
    shape = f"{size[0]}x{size[1]}, batch {batch}, gradient checkpointing {checkpointing}, {PRECISION_NAMES.get(base.mixed_precision, base.mixed_precision)}"
    return MemoryPlan(torch.device(device), phases, shape, capacity)


def _denoise(model, latents: torch.Tensor, batch: int) -> torch.Tensor:
    """The denoiser on meta `latents` with meta conditioning, as training calls it: the UNet with the text (and
    SDXL's pooled text and time ids), or SD3's transformer with the joint text (the CLIPs' tokens, then T5's
    `t5_max_length`) and the pooled embedding."""
    config, dtype = model.unet.config, model.dtype
    tokens = model.pipe.tokenizer.model_max_length
    if model.flow_matching:
        text = meta(batch, tokens + model.t5_max_length, config.joint_attention_dim, dtype=dtype)
        pooled = meta(batch, config.pooled_projection_dim, dtype=dtype)
        return model.unet(
            hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=meta(batch), return_dict=False
        )[0]
    kwargs = {"encoder_hidden_states": meta(batch, tokens, config.cross_attention_dim, dtype=dtype)}
    if model.family.time_ids:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": meta(batch, pooled, dtype=dtype), "time_ids": meta(batch, 6, dtype=dtype)}
    return model.unet(latents, meta(batch, dtype=torch.long), **kwargs)[0]


def _latents(model, batch: int, size: tuple[int, int]) -> torch.Tensor:
    factor = 2 ** (len(model.pipe.vae.config.block_out_channels) - 1)
    return meta(batch, model.unet.config.in_channels, size[1] // factor, size[0] // factor, dtype=model.dtype)


def _step_peak(model, size: tuple[int, int], batch: int, compute: torch.dtype | None) -> int:
    """The most one training step's forward and backward hold at once, beyond the weights: the trained text
    encoders' forward first, then the UNet's, then the backward. The backward is taken to the latents only: it runs
    through every layer and releases every saved tensor as the real one does, but makes no weight gradients (counted
    with the weights, where they live until the optimizer steps, not here)."""
    unet, trained_encoders = model.unet, [model.text_encoders[c] for c in model.trained[1:]]  # the denoiser first
    with on_meta(unet, *trained_encoders, dtype_of_trained=compute), counting() as live:
        text = [_text_forward(encoder, batch, model.pipe.tokenizer.model_max_length) for encoder in trained_encoders]
        latents = _latents(model, batch, size).requires_grad_()
        prediction = _denoise(model, latents, batch)
        loss = (prediction.float() - meta(*prediction.shape)).pow(2).mean()
        del prediction
        torch.autograd.backward(loss, inputs=[latents])
        del loss, text, latents
    return live.peak


def _text_forward(encoder: nn.Module, batch: int, tokens: int) -> torch.Tensor:
    output = encoder(meta(batch, tokens, dtype=torch.long), output_hidden_states=True)
    return output.hidden_states[-2]


@torch.no_grad()
def _sample_peak(model, size: tuple[int, int]) -> int:
    """One denoising step of a sample: the denoiser on the conditional and unconditional rows at once."""
    with on_meta(model.unet), counting() as live:
        _denoise(model, _latents(model, 2, size), 2)
    return live.peak


@torch.no_grad()
def _vae_encode_peak(vae, batch: int, size: tuple[int, int]) -> int:
    with on_meta(vae), counting() as live:
        vae.encode(meta(batch, 3, size[1], size[0], dtype=vae.dtype))
    return live.peak


@torch.no_grad()
def _vae_decode_peak(vae, size: tuple[int, int]) -> int:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with on_meta(vae), counting() as live:
        vae.decode(meta(1, vae.config.latent_channels, size[1] // factor, size[0] // factor, dtype=vae.dtype))
    return live.peak
