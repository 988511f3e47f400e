"""Shared fixtures: the tiny pipeline (in memory and as a folder), small random LoRAs, LoRA files spelled as each
format documents them, a tiny training set and a fast training config; the parsing and running of the commands that
README.md and docs/ show. Helpers that build things are fixtures returning the function, so tests take them as
arguments instead of importing each other."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from sdlora.core import formats
from sdlora.core.state import LoraModule, LoraState
from sdlora.models.loading import write_tiny_model
from sdlora.models.tiny import build_tiny_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline
from sdlora.training.config import TrainConfig


def _read_line(stream, timeout: float = 120.0) -> str:
    """The next line of a child process's output, or a test failure after `timeout` seconds (never a hang)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(stream.readline)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"no line from the child process within {timeout:g} s")
    finally:
        pool.shutdown(wait=False)  # a reader still blocked ends when the test kills the child


@pytest.fixture(scope="session")
def read_line():
    """`read_line(stream, timeout=120.0) -> str`: readline() that fails the test instead of hanging."""
    return _read_line


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny pipeline folder (read-only for tests: copy it before changing it)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A saved tiny SDXL pipeline folder (read-only for tests: copy it before changing it)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", variant="sdxl")


@pytest.fixture
def tiny_sdxl_pipe():
    """A fresh in-memory tiny SDXL pipeline (fp32; text encoders 32 and 48 wide, UNet cross-attention 80)."""
    return build_tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A saved tiny SD3 pipeline folder (read-only for tests: copy it before changing it)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd3", variant="sd3")


@pytest.fixture
def tiny_sd3_pipe():
    """A fresh in-memory tiny SD3 pipeline (fp32; CLIP-L 32, CLIP-G 48, T5 96 wide, joint attention 40, three blocks)."""
    return build_tiny_sd3_pipeline()


@pytest.fixture
def tiny_pipe():
    """A fresh in-memory tiny pipeline (fp32, random weights from seed 0)."""
    return build_tiny_pipeline()


def _random_lora_state(
    pipe,
    rank: int = 4,
    alpha: float = 8.0,
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_encoder: bool = True,
    seed: int = 1,
    std: float = 0.1,
) -> LoraState:
    """A LoRA with non-zero up and down on every matching module of `pipe` (alpha != rank by default)."""
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}

    def add(path: str, layer) -> None:
        if isinstance(layer, torch.nn.Linear):
            down = torch.randn(rank, layer.in_features, generator=generator) * std
            up = torch.randn(layer.out_features, rank, generator=generator) * std
        else:
            kh, kw = layer.kernel_size
            down = torch.randn(rank, layer.in_channels, kh, kw, generator=generator) * std
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator) * std
        modules[path] = LoraModule(down, up, alpha)

    for name, layer in pipe.unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in unet_targets) and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            add("unet." + name, layer)
    if text_encoder:
        for component in ("text_encoder", "text_encoder_2"):  # both of SDXL's
            for name, layer in getattr(pipe, component, torch.nn.Module()).named_modules():
                if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                    # files always spell the text encoder with `text_model.`; transformers 5 dropped it from the tree
                    path = name if name.startswith("text_model.") else "text_model." + name
                    add(f"{component}.{path}", layer)
    return LoraState(modules)


def _every_linear_sd3_lora(pipe, rank: int = 3, alpha: float = 5.0, seed: int = 0) -> LoraState:
    """A LoRA (alpha != rank, random factors) on every Linear and Conv2d of the SD3 transformer and the three text
    encoders of `pipe`."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        for name, layer in getattr(pipe, component).named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            clip = component in ("text_encoder", "text_encoder_2") and not name.startswith(("text_model.", "text_projection"))
            path = "text_model." + name if clip else name
            if isinstance(layer, torch.nn.Linear):
                down, up = (
                    torch.randn(rank, layer.in_features, generator=generator),
                    torch.randn(layer.out_features, rank, generator=generator),
                )
            else:
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
            modules[f"{component}.{path}"] = LoraModule(down, up, alpha)
    return LoraState(modules)


@pytest.fixture(scope="session")
def every_linear_lora():
    """`every_linear_lora(sd3_pipe, rank=3, alpha=5.0, seed=0)`: a LoRA on every Linear/Conv2d of an SD3 pipeline."""
    return _every_linear_sd3_lora


@pytest.fixture(scope="session")
def random_lora_state():
    """`random_lora_state(pipe, rank=4, alpha=8.0, unet_targets=..., text_encoder=True, seed=1, std=0.1)`."""
    return _random_lora_state


@pytest.fixture
def lora_state(tiny_pipe):
    """A rank-4, alpha-8 LoRA on the tiny UNet's attention projections and the text encoder's."""
    return _random_lora_state(tiny_pipe)


# ---------------------------------------------------------------- LoRA files spelled as each format documents them

RANK, ALPHA = 4, 8.0
CROSS_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # input width = text-embedding width
SELF_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
# per format, the documented name of each module (kohya LDM: SD1/SDXL input block 4 = down_blocks.1 attention 0)
_LDM = {CROSS_K: "input_blocks_4_1_transformer_blocks_0_attn2_to_k", SELF_Q: "input_blocks_4_1_transformer_blocks_0_attn1_to_q"}
_ATTN_PROCS = {CROSS_K: "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
               SELF_Q: "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
               TE_Q: "text_model.encoder.layers.0.self_attn.to_q_lora"}  # fmt: skip
# the alpha each format implies: stored (kohya .alpha, diffusers/peft lora_alpha) or none (= rank, scale 1)
EXPECTED_ALPHA = {
    formats.DIFFUSERS: ALPHA,
    formats.KOHYA: ALPHA,
    formats.KOHYA_LDM: ALPHA,
    formats.DIFFUSERS_OLD: RANK,
    formats.ATTN_PROCS: RANK,
    formats.PEFT: ALPHA,
}


def _write_format_file(
    folder: Path, fmt: str, cross_width: int = 768, text_width: int | None = 768, text2_width: int | None = None
) -> Path:
    """A small LoRA file in `fmt` with keys spelled as the format documents them (not written by sdlora)."""
    generator = torch.Generator().manual_seed(0)

    def pair(width_in: int, width_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(RANK, width_in, generator=generator), torch.randn(width_out, RANK, generator=generator)

    unet = {CROSS_K: pair(cross_width, 640), SELF_Q: pair(640, 640)}
    te = {TE_Q: pair(text_width, text_width)} if text_width and fmt != formats.PEFT else {}
    te2 = {TE_Q: pair(text2_width, text2_width)} if text2_width else {}
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}

    def put(name: str, down_suffix: str, up_suffix: str, lora: tuple[torch.Tensor, torch.Tensor], alpha_key: str | None = None) -> None:
        tensors[name + down_suffix], tensors[name + up_suffix] = lora
        if alpha_key:
            tensors[name + alpha_key] = torch.tensor(ALPHA)

    underscored = "_".join
    if fmt == formats.DIFFUSERS:
        for prefix, modules in (("unet", unet), ("text_encoder", te)):
            for path, lora in modules.items():
                put(f"{prefix}.{path}", ".lora_A.weight", ".lora_B.weight", lora)
        header = {"unet.r": RANK, "unet.lora_alpha": ALPHA, "text_encoder.r": RANK, "text_encoder.lora_alpha": ALPHA}
        metadata = {"format": "pt", formats.METADATA_KEY: json.dumps(header)}
    elif fmt in (formats.KOHYA, formats.KOHYA_LDM):
        te_prefix = "lora_te1_" if te2 else "lora_te_"
        for path, lora in unet.items():
            name = _LDM[path] if fmt == formats.KOHYA_LDM else underscored(path.split("."))
            put("lora_unet_" + name, ".lora_down.weight", ".lora_up.weight", lora, ".alpha")
        for prefix, modules in ((te_prefix, te), ("lora_te2_", te2)):
            for path, lora in modules.items():
                put(prefix + underscored(path.split(".")), ".lora_down.weight", ".lora_up.weight", lora, ".alpha")
        metadata = {"ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}
    elif fmt == formats.DIFFUSERS_OLD:
        for path, lora in unet.items():
            put(f"unet.{path}", ".lora.down.weight", ".lora.up.weight", lora)
        for path, lora in te.items():
            put(f"text_encoder.{path}", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", lora)
    elif fmt == formats.ATTN_PROCS:
        for prefix, modules in (("unet", unet), ("text_encoder", te)):
            for path, lora in modules.items():
                put(f"{prefix}.{_ATTN_PROCS[path]}", ".down.weight", ".up.weight", lora)
    elif fmt == formats.PEFT:
        for path, lora in unet.items():
            put(f"base_model.model.{path}", ".lora_A.weight", ".lora_B.weight", lora)
        (folder / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(unet)})
        )
    path = folder / ("adapter_model.safetensors" if fmt == formats.PEFT else f"{fmt}.safetensors")
    save_file(tensors, str(path), metadata=metadata or None)
    return path


@pytest.fixture(scope="session")
def write_format_file():
    """`write_format_file(folder, fmt, cross_width=768, text_width=768, text2_width=None) -> Path`."""
    return _write_format_file


@pytest.fixture(scope="session")
def format_rank_alpha():
    """(rank, {format: the alpha a reader must find}) of the files `write_format_file` writes."""
    return RANK, EXPECTED_ALPHA


# ---------------------------------------------------------------- training on the tiny model


def _make_dataset(folder: Path, count: int = 6, size: int = 64) -> Path:
    """Flat-colour shapes with sidecar captions, a few portrait/landscape for buckets."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for index in range(count):
        width, height = (size, size) if index % 3 == 0 else (size, size * 3 // 2) if index % 3 == 1 else (size * 3 // 2, size)
        image = Image.new("RGB", (width, height), (240, 235, 220))
        draw = ImageDraw.Draw(image)
        colour = colours[index % len(colours)]
        draw.ellipse((width // 6, height // 6, width * 5 // 6, height * 5 // 6), fill=colour)
        image.save(folder / f"img{index:02d}.png")
        (folder / f"img{index:02d}.txt").write_text(f"a {colour} circle, flat poster")
    return folder


@pytest.fixture
def dataset(tmp_path):
    """Six captioned images (square, portrait, landscape) in tmp_path/data."""
    return _make_dataset(tmp_path / "data")


def _tiny_config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(
        data_dir=str(dataset),
        output_dir=str(out),
        model="tiny",
        resolution=64,
        rank=4,
        alpha=8.0,
        steps=4,
        batch_size=2,
        lr=1e-3,
        checkpoint_every=2,
        validate_every=0,
        sample_steps=2,
        trigger="sks",
        seed=3,
    )
    options.update(overrides)
    return TrainConfig.from_options(**options)


@pytest.fixture(scope="session")
def make_dataset():
    """`make_dataset(folder, count=6, size=64) -> folder` of flat-colour shapes with sidecar captions."""
    return _make_dataset


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(dataset, out, **overrides) -> TrainConfig`: 4 fast steps on the tiny model."""
    return _tiny_config


# ---------------------------------------------------------------- trained adapters of every kind on the tiny model


def _adapted_tiny_pipe(kind: str, rank: int, alpha: float, conv_rank: int, conv_alpha: float, seed: int, **options):
    """The tiny pipeline with `kind` on every UNet layer (`--preset all`, the 3x3 convs at `conv_rank`/`conv_alpha`)
    and on the text encoder, its adapter weights moved at random (N(0, 0.2) from `seed`) as training would leave
    them; `options`: add_lora's (lycoris, dora_axis)."""
    from sdlora.core.targets import text_encoder_target_modules, unet_target_modules
    from sdlora.training import network

    pipe = build_tiny_pipeline()
    unet_targets = unet_target_modules(pipe.unet, "all")
    network.add_lora(pipe.unet, unet_targets, rank, alpha, kind=kind, conv_rank=conv_rank, conv_alpha=conv_alpha, **options)
    network.add_lora(pipe.text_encoder, text_encoder_target_modules(pipe.text_encoder), rank, alpha, kind=kind, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for param in network.lora_parameters(model):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return pipe


@pytest.fixture(scope="session")
def adapted_tiny_pipe():
    """`adapted_tiny_pipe(kind, rank, alpha, conv_rank, conv_alpha, seed, **add_lora options) -> pipe` with that
    adapter on every UNet layer and the text encoder, its weights moved at random as training would leave them."""
    return _adapted_tiny_pipe


def _effective_weights(pipe) -> dict[str, torch.Tensor]:
    """Each adapted layer's effective weight, by its LoraState path (`unet.…`, `text_encoder.text_model.…`): peft's
    own merge, times the input scale where DoRA's magnitude is per input column (`network.input_dora_scale`)."""
    from sdlora.training import network

    weights = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, layer in network._adapter_layers(model, "default").items():
            layer.merge(adapter_names=["default"])
            merged = layer.get_base_layer().weight.detach().clone()
            layer.unmerge()
            if hasattr(layer, network.INPUT_MAGNITUDE):
                merged = merged * network.input_dora_scale(layer).view(1, -1, *[1] * (merged.dim() - 2))
            weights[f"{component}.{network._canonical(component, name)}"] = merged
    return weights


@pytest.fixture(scope="session")
def effective_weights():
    """`effective_weights(pipe) -> {LoraState path: weight}`: what each adapted layer of `pipe` computes with."""
    return _effective_weights


def _layer_reference(layer: torch.nn.Module, weight: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An input for `layer` (a Linear or a Conv2d) and the output the layer would give with `weight` instead of its own."""
    if isinstance(layer, torch.nn.Conv2d):
        x = torch.randn(2, layer.in_channels, 6, 5, generator=generator)
        return x, torch.nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    x = torch.randn(3, layer.in_features, generator=generator)
    return x, torch.nn.functional.linear(x, weight, layer.bias)


@pytest.fixture(scope="session")
def layer_reference():
    """`layer_reference(layer, weight, generator) -> (x, output)`: the layer's output at another weight, for a
    reference implementation's forward pass to be compared with."""
    return _layer_reference


# ---------------------------------------------------------------- an SDXL single-file checkpoint, built by hand


def _openclip_tensors(text_encoder_2: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder in OpenCLIP's layout, written from its documented names (not by sdlora's tables):
    q/k/v fused into attn.in_proj_*, c_fc/c_proj, ln_1/ln_2, positional_embedding, ln_final, text_projection as x @ P."""
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[3]) for k in text_encoder_2 if k.startswith("text_model.encoder.layers.")})
    names = {
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
    }
    for layer in layers:
        source, block = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for param in ("weight", "bias"):
            out[f"{block}attn.in_proj_{param}"] = torch.cat([text_encoder_2[f"{source}self_attn.{p}_proj.{param}"] for p in "qkv"])
            for ours, theirs in names.items():
                out[f"{block}{theirs}.{param}"] = text_encoder_2[f"{source}{ours}.{param}"]
    out[prefix + "token_embedding.weight"] = text_encoder_2["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = text_encoder_2["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = text_encoder_2["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = text_encoder_2["text_model.final_layer_norm.bias"]
    out[prefix + "text_projection"] = text_encoder_2["text_projection.weight"].T.contiguous()
    return out


def _write_sdxl_single_file(model_dir: Path, out: Path, text_encoder_2: bool = True) -> Path:
    """The tiny SDXL folder as an SGM single-file checkpoint (UNet in LDM names, the first text encoder in
    transformers' names, the second in OpenCLIP's), the way A1111 and ComfyUI keep SDXL models."""
    from safetensors.torch import load_file

    from sdlora.core.families import SDXL
    from sdlora.core.formats.ldm import ldm_unet_table_for_config
    from sdlora.core.formats.single_file import single_file_slot

    table = ldm_unet_table_for_config(json.loads((model_dir / "unet" / "config.json").read_text()))
    tensors = {
        single_file_slot("unet", k, table, None, {}).key: v
        for k, v in load_file(model_dir / "unet/diffusion_pytorch_model.safetensors").items()
    }
    first = SDXL.text_encoders[0]
    for key, value in load_file(model_dir / "text_encoder/model.safetensors").items():
        if not key.endswith("position_ids"):
            tensors[single_file_slot("text_encoder", key, table, first, {}).key] = value
    if text_encoder_2:
        second = {
            k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in load_file(model_dir / "text_encoder_2/model.safetensors").items()
        }
        tensors.update(_openclip_tensors(second, SDXL.text_encoders[1].single_file_prefix))
    tensors.update({"first_stage_model." + k: v for k, v in load_file(model_dir / "vae/diffusion_pytorch_model.safetensors").items()})
    save_file(tensors, str(out), metadata={"format": "pt", "note": "kept"})
    return out


@pytest.fixture(scope="session")
def write_sdxl_single_file():
    """`write_sdxl_single_file(model_dir, out, text_encoder_2=True) -> out`."""
    return _write_sdxl_single_file


# ---------------------------------------------------------------- an SD3 single-file checkpoint, built by hand


def _sai_mmdit_tensors(transformer: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD3's transformer under SAI's MMDiT names, written as the inverse of diffusers'
    `convert_sd3_transformer_checkpoint_to_diffusers` (not by sdlora's tables): q/k/v fused into `qkv`, and the
    continuous norms (the last block's context norm, the final layer's) with their halves in (shift, scale) order."""
    t = dict(transformer)

    def swapped(tensor: torch.Tensor) -> torch.Tensor:
        scale, shift = tensor.chunk(2, dim=0)
        return torch.cat([shift, scale])

    out = {
        "pos_embed": t.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": t.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": t.pop("pos_embed.proj.bias"),
        "context_embedder.weight": t.pop("context_embedder.weight"),
        "context_embedder.bias": t.pop("context_embedder.bias"),
        "final_layer.linear.weight": t.pop("proj_out.weight"),
        "final_layer.linear.bias": t.pop("proj_out.bias"),
        "final_layer.adaLN_modulation.1.weight": swapped(t.pop("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": swapped(t.pop("norm_out.linear.bias")),
    }
    for sai, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for index, linear in (("0", "linear_1"), ("2", "linear_2")):
            for param in ("weight", "bias"):
                out[f"{sai}.mlp.{index}.{param}"] = t.pop(f"time_text_embed.{ours}.{linear}.{param}")
    for i in range(layers):
        block, joint = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == layers - 1
        streams = {
            "x_block.attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.norm_q", "attn.norm_k"),
            "context_block.attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", None if last else "attn.to_add_out",
                                   "attn.norm_added_q", "attn.norm_added_k"),
            "x_block.attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn2.norm_q", "attn2.norm_k"),
        }  # fmt: skip
        for sai, (q, k, v, proj, norm_q, norm_k) in streams.items():
            if block + q + ".weight" not in t:
                continue  # a block without a second attention
            for param in ("weight", "bias"):
                out[f"{joint}{sai}.qkv.{param}"] = torch.cat([t.pop(f"{block}{name}.{param}") for name in (q, k, v)])
                if proj is not None:
                    out[f"{joint}{sai}.proj.{param}"] = t.pop(f"{block}{proj}.{param}")
            for name, ln in ((norm_q, "ln_q"), (norm_k, "ln_k")):
                if block + name + ".weight" in t:
                    out[f"{joint}{sai}.{ln}.weight"] = t.pop(f"{block}{name}.weight")
        for param in ("weight", "bias"):
            out[f"{joint}x_block.adaLN_modulation.1.{param}"] = t.pop(f"{block}norm1.linear.{param}")
            context_norm = t.pop(f"{block}norm1_context.linear.{param}")
            out[f"{joint}context_block.adaLN_modulation.1.{param}"] = swapped(context_norm) if last else context_norm
            out[f"{joint}x_block.mlp.fc1.{param}"] = t.pop(f"{block}ff.net.0.proj.{param}")
            out[f"{joint}x_block.mlp.fc2.{param}"] = t.pop(f"{block}ff.net.2.{param}")
            if not last:
                out[f"{joint}context_block.mlp.fc1.{param}"] = t.pop(f"{block}ff_context.net.0.proj.{param}")
                out[f"{joint}context_block.mlp.fc2.{param}"] = t.pop(f"{block}ff_context.net.2.{param}")
    assert not t, f"transformer tensors without an SAI name: {sorted(t)}"
    return {"model.diffusion_model." + key: value for key, value in out.items()}


def _write_sd3_single_file(model_dir: Path, out: Path, text_encoders: bool = True) -> Path:
    """The tiny SD3 folder as SAI's single-file checkpoint (`sd3_medium_incl_clips_t5xxlfp16.safetensors`'s layout):
    the MMDiT under `model.diffusion_model.`, CLIP-L, CLIP-G and T5 under `text_encoders.{clip_l,clip_g,t5xxl}.
    transformer.` in transformers' names (CLIPs with `text_model.`), the VAE under `first_stage_model.`."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    tensors = _sai_mmdit_tensors(load_file(model_dir / "transformer/diffusion_pytorch_model.safetensors"), config["num_layers"])
    if text_encoders:
        for folder, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
            for key, value in load_file(model_dir / folder / "model.safetensors").items():
                clip = name != "t5xxl" and not key.startswith(("text_model.", "text_projection"))
                tensors[f"text_encoders.{name}.transformer.{'text_model.' if clip else ''}{key}"] = value
    tensors.update({"first_stage_model." + k: v for k, v in load_file(model_dir / "vae/diffusion_pytorch_model.safetensors").items()})
    save_file(tensors, str(out), metadata={"format": "pt", "note": "kept"})
    return out


@pytest.fixture(scope="session")
def write_sd3_single_file():
    """`write_sd3_single_file(model_dir, out, text_encoders=True) -> out`."""
    return _write_sd3_single_file


# ---------------------------------------------------------------- commands shown in markdown (README.md, docs/)

_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}


def _bash_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```bash block of a markdown text."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            start, index = index + 1, index + 1
            while lines[index].strip() != "```":
                index += 1
            blocks.append((start + 1, "\n".join(lines[start:index])))
        index += 1
    return blocks


def _shell_commands(block: str) -> list[str]:
    """The commands of a bash block, `\\` continuations joined; comment lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _sdlora_invocations(command: str) -> list[list[str]]:
    """The arguments after `sdlora` of every `sdlora ...`, `python -m sdlora ...`, `accelerate launch ... -m sdlora`
    or `torchrun ... -m sdlora` segment of a command line (segments split at &&, ||, ;, |)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token in _SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        if words and words[0] == "sdlora":
            found.append(words[1:])
        elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "sdlora":
            found.append(words[words.index("-m") + 2 :])
    return found


@pytest.fixture(scope="session")
def bash_blocks():
    """`bash_blocks(markdown_text) -> [(first line number, body)]` of every ```bash block."""
    return _bash_blocks


@pytest.fixture(scope="session")
def shell_commands():
    """`shell_commands(block) -> [command]`: a bash block's commands, continuations joined, comments dropped."""
    return _shell_commands


@pytest.fixture(scope="session")
def sdlora_invocations():
    """`sdlora_invocations(command) -> [[arg, ...]]`: the arguments of each sdlora call in a command line."""
    return _sdlora_invocations


REPO_ROOT = Path(__file__).resolve().parents[1]


def _repo_workspace(folder: Path) -> Path:
    """`folder`, made to look like the repository root to the docs' relative paths; outputs land in it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datasets_examples").symlink_to(REPO_ROOT / "datasets_examples", target_is_directory=True)
    return folder


def _run_sdlora(args: list[str], cwd: Path) -> str:
    """Run `sdlora ARGS` in `cwd` as a user would (a new process, offline); its stdout, or a test failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sdlora", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"sdlora {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="session")
def repo_workspace():
    """`repo_workspace(folder) -> folder`: a folder where the docs' commands run as from the repository root."""
    return _repo_workspace


@pytest.fixture(scope="session")
def run_sdlora():
    """`run_sdlora(args, cwd) -> stdout`: `sdlora ARGS` in a new process; fails the test on a non-zero exit."""
    return _run_sdlora


@pytest.fixture(scope="session")
def train_once(tmp_path_factory):
    """`train_once(args, cwd)`: `sdlora train ARGS` (with `--output`), run once per session for the same ARGS and its
    output folder copied into `cwd`: the README and the getting-started page train the same demo LoRA."""
    runs: dict[tuple[str, ...], Path | str] = {}  # the workspace of a run, or why it failed (not run twice)

    def train(args: list[str], cwd: Path) -> None:
        assert args[0] == "train" and "--output" in args, args
        if tuple(args) not in runs:
            work = _repo_workspace(tmp_path_factory.mktemp("train-once"))
            try:
                _run_sdlora(args, work)
                runs[tuple(args)] = work
            except (AssertionError, subprocess.TimeoutExpired) as err:
                runs[tuple(args)] = str(err)
                raise
        work = runs[tuple(args)]
        if isinstance(work, str):
            pytest.fail(f"an earlier test's run of the same command failed:\n{work}")
        output = args[args.index("--output") + 1]
        shutil.copytree(work / output, cwd / output, symlinks=True)

    return train
