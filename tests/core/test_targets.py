"""Tests for sdlora/core/targets.py on SD3's transformer: `--lora-blocks` (kohya's train_block_indices syntax) and its
refusals, and how many modules each preset adapts on SD3.5 Medium's transformer (sd3-shaped, on the meta device)
against kohya's sd3 LoRA and diffusers' SD3 training script."""

from __future__ import annotations

import re

import pytest

from sdlora.core.formats.mmdit import mmdit_layer
from sdlora.core.targets import parse_block_selection, unet_target_modules
from sdlora.errors import UserError
from sdlora.models.tiny import build_sd3_shaped_pipeline


@pytest.fixture(scope="module")
def medium():
    """SD3.5 Medium's transformer on the meta device: 24 joint blocks, attn2 in the first 13, the last context_pre_only."""
    return build_sd3_shaped_pipeline(meta=True, with_t5=False).transformer


def _block(name: str) -> int:
    return int(re.match(r"transformer_blocks\.(\d+)\.", name)[1])


def test_block_selection_reads_kohyas_syntax():
    assert parse_block_selection("0-11,20") == (*range(12), 20)
    assert parse_block_selection(" 3 , 1-2,2 ") == (1, 2, 3)  # spaces, repeats and order do not matter
    assert parse_block_selection("all") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"^--lora-blocks '': '' is not a block index or range: write e.g. 0-11,20$"),
        ("0-3,,5", r"'' is not a block index or range"),
        ("one", r"'one' is not a block index or range"),
        ("-2", r"'-2' is not a block index or range"),
        ("4-", r"'4-' is not a block index or range"),
        ("1.5", r"'1.5' is not a block index or range"),
        ("9-2", r"^--lora-blocks '9-2': the range 9-2 runs backwards: write 2-9$"),
    ],
)
def test_bad_block_selections_are_one_line_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_block_selection(text)


def test_lora_blocks_keep_only_the_chosen_joint_blocks(medium):
    every = unet_target_modules(medium, "all")
    chosen = unet_target_modules(medium, "all", "0-11,20")
    assert {_block(name) for name in chosen} == {*range(12), 20}
    assert chosen == [name for name in every if _block(name) in {*range(12), 20}]  # the preset's layers, in order
    # blocks 0-11 carry attn2 (13 layers + 4 of attn2 + the rest: 14 + 4 = 18 each), block 20 has no attn2 (14)
    assert len(chosen) == 12 * 18 + 14
    last = {f"transformer_blocks.23.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    assert set(unet_target_modules(medium, "attn", "23")) == last  # the last block: no to_add_out (context_pre_only)


def test_lora_blocks_beyond_the_model_or_on_a_unet_are_refused(medium, tiny_pipe):
    with pytest.raises(UserError, match=r"^--lora-blocks 0-24: block 24 is beyond this transformer's 24 joint blocks \(0-23\)$"):
        unet_target_modules(medium, "attn", "0-24")
    with pytest.raises(
        UserError, match=r"^--lora-blocks picks joint blocks of SD3's transformer; a UNet \(UNet2DConditionModel\) has none"
    ):
        unet_target_modules(tiny_pipe.unet, "attn", "0-3")


def test_preset_module_counts_against_kohya_and_diffusers(medium):
    counts = {preset: len(unet_target_modules(medium, preset)) for preset in ("attn", "attn-ff", "all")}
    # kohya's networks/lora_sd3.py (SD3_TARGET_REPLACE_MODULE = ["SingleDiTBlock"]) adapts every Linear of each joint
    # block's x_block and context_block, in SAI's names: x_block attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
    # adaLN_modulation.1 (5), plus attn2.qkv and attn2.proj in SD3.5 Medium's first 13 blocks; context_block the same 5
    # except the last block (pre_only: attn.qkv and adaLN_modulation.1 only). q/k/v are one fused qkv there.
    kohya_sai = 24 * 5 + 13 * 2 + 23 * 5 + 2
    fused_qkv = 24 + 13 + 24  # x attn, x attn2, context attn: each is three of diffusers' layers
    assert kohya_sai == 263 and counts["all"] == kohya_sai + 2 * fused_qkv == 385
    sai_names = {mmdit_layer(name)[0] for name in unet_target_modules(medium, "all")}
    assert len(sai_names) == kohya_sai  # our `all` is kohya's default set, layer for layer
    assert all(
        re.fullmatch(r"joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)", n) for n in sai_names
    )
    # diffusers' train_dreambooth_lora_sd3.py default (no --lora_layers): attn.to_k/q/v, attn.to_out.0 and
    # attn.add_k/q/v_proj, attn.to_add_out as peft suffixes: both streams' attention of every block, not attn2
    diffusers_default = 24 * 8 - 1  # the last block has no to_add_out
    ours_without_attn2 = [name for name in unet_target_modules(medium, "attn") if ".attn2." not in name]
    assert len(ours_without_attn2) == diffusers_default == 191
    assert counts["attn"] == diffusers_default + 13 * 4 == 243  # sdlora's attn adds SD3.5 Medium's attn2
    assert counts["attn-ff"] == counts["attn"] + 24 * 2 + 23 * 2 == 337  # both streams' MLPs (none in the last context)
