"""The sd3-shaped model (SD3.5 Medium's transformer, on the meta device): every layer has a name in kohya's SD3
files, and the q/k/v LoRAs of every block fuse into `qkv` and split back exactly at the real widths."""

from __future__ import annotations

import pytest
import torch

from sdlora.core.files import read_lora, write_kohya
from sdlora.core.formats.mmdit import fuse_qkv, split_qkv, to_mmdit
from sdlora.core.state import LoraModule, LoraState
from sdlora.models.tiny import SD35_MEDIUM_TRANSFORMER, build_sd3_shaped_pipeline


@pytest.fixture(scope="module")
def sd3_shaped():
    return build_sd3_shaped_pipeline(meta=True)


def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)}


def test_sd3_shaped_has_sd35_mediums_layers(sd3_shaped):
    transformer = sd3_shaped.transformer
    assert all(p.device.type == "meta" for p in transformer.parameters())
    blocks = transformer.transformer_blocks
    assert len(blocks) == 24 and SD35_MEDIUM_TRANSFORMER["num_attention_heads"] * 64 == 1536
    assert [i for i, block in enumerate(blocks) if block.attn2 is not None] == list(range(13))
    linears = _linears(transformer)
    # per block: q/k/v/out, the context's q/k/v(/out), 2 + 2 MLP linears, 2 norms' linears, and attn2's 4 where present;
    # the last block has no context output or MLP (context_pre_only); outside: the timestep and pooled-text embedders'
    # 2 + 2, context_embedder, proj_out and norm_out's linear (the patch embedding is a conv)
    per_block = 4 + 4 + 4 + 2
    expected = 24 * per_block + 13 * 4 - 3 + 7
    assert len(linears) == expected == 392
    assert linears["transformer_blocks.0.attn.to_q"].weight.shape == (1536, 1536)
    assert linears["context_embedder"].weight.shape == (1536, 4096)
    assert sd3_shaped.text_encoder_3.config.d_model == 4096 and sd3_shaped.vae.config.latent_channels == 16


def test_every_linear_has_a_kohya_name_and_qkv_fuses_exactly_on_every_block(sd3_shaped, tmp_path):
    """A rank-2 LoRA (alpha 3) on every Linear of the real transformer: kohya's file names each (through SAI's MMDiT
    names, q/k/v fused), and it reads back as the same modules with the same factors and scale."""
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, layer in _linears(sd3_shaped.transformer).items():
        out_features, in_features = layer.weight.shape
        down = torch.randn(2, in_features, generator=generator) * 0.01
        up = torch.randn(out_features, 2, generator=generator) * 0.01
        modules[f"transformer.{name}"] = LoraModule(down, up, 3.0)
    state = LoraState(modules)
    sai = to_mmdit({path.removeprefix("transformer."): module for path, module in modules.items()})
    fused = [path for path in sai if path.endswith("qkv")]
    assert len(fused) == 24 * 2 + 13  # image and context stream per block, attn2 on the first 13
    assert all(sai[path].rank == 6 for path in fused)
    file = tmp_path / "sd3_shaped_every_linear.safetensors"
    write_kohya(state, file)
    back = read_lora(file)
    assert set(back.modules) == set(state.modules)
    for path, module in state.modules.items():  # the same factors (q/k/v: the fused up's own columns), the same scale
        read = back.modules[path]
        assert torch.equal(read.down, module.down) and torch.equal(read.up, module.up), path
        assert read.scale == pytest.approx(module.scale, rel=1e-7), path


def test_fuse_then_split_is_the_identity_at_real_width():
    generator = torch.Generator().manual_seed(1)
    parts = {
        third: (name, LoraModule(torch.randn(rank, 1536, generator=generator), torch.randn(1536, rank, generator=generator), alpha))
        for third, (name, rank, alpha) in enumerate((("to_q", 4, 2.0), ("to_k", 8, 4.0), ("to_v", 2, 1.0)))
    }
    fused = fuse_qkv(parts)
    assert fused.rank == 14 and fused.up.shape == (4608, 14)
    split = split_qkv(fused, "joint_blocks.0.x_block.attn.qkv")
    for third, (_, module) in parts.items():
        torch.testing.assert_close(split[third].delta(), module.delta(), rtol=1e-6, atol=1e-6)
