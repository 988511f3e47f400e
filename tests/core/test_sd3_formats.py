"""SD3 LoRA files: diffusers' names <-> kohya's (SAI's MMDiT names, q/k/v fused into one exact qkv LoRA), checked
against diffusers' own SAI -> diffusers checkpoint conversion; ComfyUI's other SD3 spellings; bad files."""

from __future__ import annotations

import pytest
import torch

from sdlora.core import formats
from sdlora.core.families import SD3, SDXL
from sdlora.core.formats.mmdit import fuse_qkv, split_qkv
from sdlora.core.kinds import LohaModule
from sdlora.core.state import LoraModule, LoraState
from sdlora.errors import UserError


def assert_same_modules(read: LoraState, written: LoraState) -> None:
    assert read.modules.keys() == written.modules.keys()
    for path, module in written.modules.items():
        other = read.modules[path]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up), path
        assert other.effective_alpha == module.effective_alpha, path


def test_every_module_of_tiny_sd3_survives_both_writers(tiny_sd3_pipe, every_linear_lora):
    state = every_linear_lora(tiny_sd3_pipe)
    counts = {c: len(state.for_component(c)) for c in state.components()}
    assert counts == {"transformer": 51, "text_encoder": 31, "text_encoder_2": 31, "text_encoder_3": 14}
    kohya = formats.to_kohya(state, SD3)
    assert formats.detect_format(kohya) == formats.KOHYA
    unet_keys = {key.split(".")[0] for key in kohya if key.startswith("lora_unet_")}
    assert len(unet_keys) == 51 - 2 * 7  # seven q/k/v triples: x and context streams of 3 blocks, attn2 of block 0
    assert_same_modules(formats.to_lora_state(kohya), state)  # the fused LoRAs read back as the LoRAs they came from
    without_t5 = LoraState({p: m for p, m in state.modules.items() if not p.startswith("text_encoder_3.")})
    tensors, header = formats.to_diffusers(without_t5)
    assert_same_modules(formats.to_lora_state(tensors, header), without_t5)


def test_kohya_names_are_sais_mmdit_names(tiny_sd3_pipe, every_linear_lora):
    kohya = formats.to_kohya(every_linear_lora(tiny_sd3_pipe), SD3)
    names = {key.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for key in kohya}
    expected = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv",
        "lora_unet_joint_blocks_0_x_block_attn_proj",
        "lora_unet_joint_blocks_0_x_block_attn2_qkv",
        "lora_unet_joint_blocks_0_x_block_attn2_proj",
        "lora_unet_joint_blocks_0_x_block_mlp_fc1",
        "lora_unet_joint_blocks_1_context_block_mlp_fc2",
        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
        "lora_unet_joint_blocks_2_context_block_attn_qkv",
        "lora_unet_x_embedder_proj",
        "lora_unet_t_embedder_mlp_0",
        "lora_unet_y_embedder_mlp_2",
        "lora_unet_final_layer_adaLN_modulation_1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_projection",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1",
    }
    assert expected <= names
    # the last block's context stream has no output projection and no MLP (context_pre_only)
    assert not any(
        name.startswith(("lora_unet_joint_blocks_2_context_block_attn_proj", "lora_unet_joint_blocks_2_context_block_mlp"))
        for name in names
    )
    qkv = kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
    assert qkv.shape == (3 * 40, 3 * 3)  # rank 3r, the three ups block-diagonal
    assert torch.count_nonzero(qkv[:40, 3:]) == 0 and torch.count_nonzero(qkv[40:80, :3]) == 0
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"].item() == 3 * 5.0  # alpha / rank unchanged: 15 / 9 = 5 / 3


def test_kohya_file_is_what_diffusers_converts_from_sai_names(tiny_sd3_pipe, every_linear_lora):
    """Each kohya module's update, placed in an SAI MMDiT checkpoint and converted by diffusers' own
    `convert_sd3_transformer_checkpoint_to_diffusers` (q/k/v row thirds, (shift, scale) swaps), equals the update of
    the diffusers-named LoRA module it was written from."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = every_linear_lora(tiny_sd3_pipe)
    kohya = formats.to_kohya(state, SD3)
    checkpoint = {"pos_embed": torch.zeros(1, 1024, 40)}
    for key in kohya:
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            module = LoraModule(kohya[name + ".lora_down.weight"], kohya[name + ".lora_up.weight"], kohya[name + ".alpha"].item())
            sai = formats.names.split_kohya_name(name.removeprefix("lora_unet_"), key)
            checkpoint[sai + ".weight"] = module.delta()
            checkpoint[sai + ".bias"] = torch.zeros(module.weight_shape()[0])
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    theirs = {key.removesuffix(".weight"): value for key, value in converted.items() if key.endswith(".weight")}
    ours = {path.removeprefix("transformer."): module.delta() for path, module in state.for_component("transformer").items()}
    assert theirs.keys() == ours.keys()
    for path, delta in ours.items():
        torch.testing.assert_close(theirs[path], delta, rtol=1e-5, atol=1e-5, msg=path)


def test_fused_qkv_is_exact_for_parts_of_other_ranks_and_alphas():
    generator = torch.Generator().manual_seed(3)
    q = LoraModule(torch.randn(2, 24, generator=generator), torch.randn(16, 2, generator=generator), alpha=3.0)
    k = LoraModule(torch.randn(5, 24, generator=generator), torch.randn(16, 5, generator=generator), alpha=4.0)
    fused = fuse_qkv({0: ("attn.to_q", q), 1: ("attn.to_k", k)})  # no v: its rows stay zero
    assert fused.rank == 7
    torch.testing.assert_close(fused.delta(), torch.cat([q.delta(), k.delta(), torch.zeros(16, 24)]), rtol=1e-6, atol=1e-6)
    parts = split_qkv(fused, "qkv")
    assert sorted(parts) == [0, 1]  # v left out, as it was
    for part, original in ((parts[0], q), (parts[1], k)):
        assert part.rank == original.rank
        torch.testing.assert_close(part.delta(), original.delta(), rtol=1e-6, atol=1e-6)


def test_a_dense_fused_qkv_reads_as_three_exact_loras():
    """kohya's own (unsplit) qkv LoRA has a dense up: each third of its rows with the whole down, at its scale."""
    generator = torch.Generator().manual_seed(4)
    fused = LoraModule(torch.randn(6, 24, generator=generator), torch.randn(48, 6, generator=generator), alpha=2.0)
    parts = split_qkv(fused, "qkv")
    assert [part.rank for part in parts.values()] == [6, 6, 6] and all(part.alpha == 2.0 for part in parts.values())
    torch.testing.assert_close(torch.cat([parts[i].delta() for i in range(3)]), fused.delta(), rtol=1e-6, atol=1e-6)


def test_a_qkv_up_factor_not_in_thirds_is_one_line():
    tensors = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.ones(4, 40),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.ones(121, 4),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0),
    }
    with pytest.raises(UserError, match=r"fused qkv, but its up factor has 121 rows, not three equal q/k/v parts") as raised:
        formats.to_lora_state(tensors)
    assert "\n" not in str(raised.value)


def test_other_additive_kinds_fuse_and_split_as_full_diffs():
    """A LoHa cannot be cut into row parts in its own factors: on q/k/v (and the swapped norms) its update becomes an
    exact full diff, which `convert --rank` can make a LoRA of; one-to-one layers keep their kind."""
    generator = torch.Generator().manual_seed(5)

    def loha() -> LohaModule:
        return LohaModule(*(torch.randn(*shape, generator=generator) for shape in ((40, 2), (2, 40), (40, 2), (2, 40))), alpha=1.0)

    parts = {p: loha() for p in "qk"}  # no v
    state = LoraState({f"transformer.transformer_blocks.0.attn.to_{p}": module for p, module in parts.items()})
    state.modules["transformer.transformer_blocks.0.ff.net.2"] = fc2 = LohaModule(
        torch.randn(40, 2, generator=generator),
        torch.randn(2, 160, generator=generator),
        torch.randn(40, 2, generator=generator),
        torch.randn(2, 160, generator=generator),
        alpha=1.0,
    )
    kohya = formats.to_kohya(state, SD3)
    fused = kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.diff"]
    torch.testing.assert_close(fused, torch.cat([parts["q"].delta(), parts["k"].delta(), torch.zeros(40, 40)]))
    assert "lora_unet_joint_blocks_0_x_block_mlp_fc2.hada_w1_a" in kohya  # written as it is
    back = formats.to_lora_state(kohya)
    for p in "qk":
        read = back.modules[f"transformer.transformer_blocks.0.attn.to_{p}"]
        assert read.kind == "full"
        torch.testing.assert_close(read.delta(), parts[p].delta(), rtol=1e-6, atol=1e-6)
    assert back.modules["transformer.transformer_blocks.0.ff.net.2"].kind == "loha"
    torch.testing.assert_close(back.modules["transformer.transformer_blocks.0.ff.net.2"].delta(), fc2.delta())


def test_kinds_that_depend_on_the_weight_cannot_fuse_or_split():
    from sdlora.core.kinds import DoraModule

    dora = DoraModule(LoraModule(torch.ones(2, 40), torch.ones(40, 2), 2.0), torch.ones(40), on_output=True)
    state = LoraState({"transformer.transformer_blocks.0.attn.to_q": dora})
    with pytest.raises(UserError, match=r"is DoRA, whose update depends on the layer's weight, and q, k and v must fuse into SD3's qkv"):
        formats.to_kohya(state, SD3)
    tensors = formats.to_kohya(LoraState({"transformer.transformer_blocks.0.attn.to_out.0": dora}), SD3)
    renamed = {key.replace("x_block_attn_proj", "x_block_attn_qkv"): value for key, value in tensors.items()}
    with pytest.raises(UserError, match=r"is DoRA, whose update depends on the layer's weight, and SD3's fused qkv must split"):
        formats.to_lora_state(
            {
                key: value.repeat(3, *[1] * (value.ndim - 1)) if "lora_up" in key or "dora_scale" in key else value
                for key, value in renamed.items()
            }
        )


def test_the_continuous_norms_swap_their_halves(tiny_sd3_pipe, every_linear_lora):
    """diffusers orders an AdaLayerNormContinuous's rows (scale, shift), SAI's code (shift, scale): the final layer's
    and the last block's context norm; an AdaLayerNormZero's rows (the other blocks') are in the same order."""
    state = every_linear_lora(tiny_sd3_pipe)
    kohya = formats.to_kohya(state, SD3)
    for diffusers_path, kohya_name, swapped in (
        ("transformer.norm_out.linear", "lora_unet_final_layer_adaLN_modulation_1", True),
        ("transformer.transformer_blocks.2.norm1_context.linear", "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", True),
        ("transformer.transformer_blocks.1.norm1_context.linear", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", False),
    ):
        up = state.modules[diffusers_path].up
        half = up.shape[0] // 2
        expected = torch.cat([up[half:], up[:half]]) if swapped else up
        assert torch.equal(kohya[kohya_name + ".lora_up.weight"], expected), diffusers_path


def test_comfyuis_other_sd3_spellings_read_as_the_transformer():
    down, up = torch.ones(2, 40), torch.ones(40, 2)
    spellings = {
        "lora_transformer_transformer_blocks_0_attn_add_q_proj": (".lora_down.weight", ".lora_up.weight", ".alpha"),  # OneTrainer
        "lycoris_transformer_blocks_1_ff_context_net_0_proj": (".lora_down.weight", ".lora_up.weight", ".alpha"),  # SimpleTuner
    }
    tensors = {}
    for name, (down_key, up_key, alpha_key) in spellings.items():
        tensors |= {name + down_key: down, name + up_key: up, name + alpha_key: torch.tensor(1.0)}
    state = formats.to_lora_state(tensors)
    assert sorted(state.modules) == [
        "transformer.transformer_blocks.0.attn.add_q_proj",
        "transformer.transformer_blocks.1.ff_context.net.0.proj",
    ]
    peft = formats.to_lora_state(
        {
            "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": down,
            "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": up,
        }
    )
    assert list(peft.modules) == ["transformer.transformer_blocks.0.attn.to_q"]


def test_diffusers_sd3_keys_read_with_their_component():
    down, up = torch.ones(2, 40), torch.ones(40, 2)
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
    }
    assert list(formats.to_lora_state(tensors).modules) == ["transformer.transformer_blocks.0.attn.to_q"]


def test_an_unknown_mmdit_layer_is_named():
    tensors = {"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.ones(2, 40)}
    tensors |= {"lora_unet_joint_blocks_0_x_block_norm1.lora_down.weight": torch.ones(2, 40)}
    tensors = {k: v for k, v in tensors.items()} | {k.replace("lora_down", "lora_up"): torch.ones(40, 2) for k in tensors}
    with pytest.raises(UserError, match=r"lora_unet_joint_blocks_0_x_block_norm1' maps to no SD3 MMDiT layer sdlora knows"):
        formats.to_lora_state(tensors)


def test_an_sd3_lora_written_for_sdxl_names_the_family():
    state = LoraState({"transformer.proj_out": LoraModule(torch.ones(2, 40), torch.ones(64, 2))})
    with pytest.raises(UserError, match=r"transformer.proj_out is for transformer, which SDXL models do not have"):
        formats.to_kohya(state, SDXL)
