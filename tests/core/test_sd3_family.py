"""SD3 as a row of the family table: the row, detection from a pipeline, a folder, a model index, a transformer config
and SAI single-file keys, and the tiny SD3 model (deterministic, asymmetric widths, attn2 on one block)."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora.core import families
from sdlora.core.families import (
    SD1,
    SD3,
    SDXL,
    check_single_file_parts,
    family_of_folder,
    family_of_lora,
    family_of_model_index,
    family_of_pipeline,
    family_of_single_file,
    family_of_transformer_config,
)
from sdlora.core.state import COMPONENTS, LoraModule, LoraState
from sdlora.errors import UserError
from sdlora.models.loading import load_pipeline
from sdlora.models.tiny import build_tiny_sd3_pipeline


def test_the_sd3_row():
    assert SD3.pipeline_class == "StableDiffusion3Pipeline" and SD3.denoiser == "transformer"
    assert SD3.components == ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    # T5 is optional: a folder without it is still an SD3 folder
    assert SD3.required_parts == ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    assert [(s.kohya_prefix, s.architecture, s.optional) for s in SD3.text_encoders] == [
        ("lora_te1_", "clip", False),
        ("lora_te2_", "clip", False),
        ("lora_te3_", "t5", True),
    ]
    assert [(s.hidden_layer, s.pooled) for s in SD3.text_encoders[:2]] == [(-2, True), (-2, True)]  # penultimate, both pooled
    assert SD3.kohya_unet_names == "mmdit" and SD3.ldm_layout is None
    assert (SD1.denoiser, SDXL.denoiser) == ("unet", "unet")
    # LoraState's component order covers every family's components
    assert {c for f in families.FAMILIES for c in f.components} == set(COMPONENTS)


def test_family_of_the_tiny_sd3_pipeline_and_its_folder(tiny_sd3_pipe, tiny_sd3_dir):
    assert family_of_pipeline(tiny_sd3_pipe) is SD3
    assert family_of_folder(tiny_sd3_dir) is SD3
    index = json.loads((tiny_sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"


def test_the_model_index_says_sd3_before_sdxl():
    """SD3's index has a text_encoder_2 as SDXL's does: the transformer (or the class) says SD3 first."""
    index = {"_class_name": "StableDiffusion3Pipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    assert family_of_model_index(index) is SD3
    assert family_of_model_index({"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_2": []}) is SD3
    assert family_of_model_index({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []}) is SDXL


def test_family_of_a_transformer_config(tmp_path):
    assert family_of_transformer_config({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 4096}) is SD3
    assert family_of_transformer_config({"joint_attention_dim": 96, "caption_projection_dim": 40}) is SD3
    with pytest.raises(UserError, match="'FluxTransformer2DModel' is of no family sdlora knows"):
        family_of_transformer_config({"_class_name": "FluxTransformer2DModel"})
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", "transformer": ["diffusers", "X"]}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    assert family_of_folder(tmp_path) is SD3


MMDIT_KEY = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
VAE_KEY = "first_stage_model.encoder.down.0.block.0.conv1.weight"


@pytest.mark.parametrize(
    "text_encoders",
    [(), ("clip_l", "clip_g"), ("clip_l", "clip_g", "t5xxl")],
    ids=["mmdit-only", "with-clips", "with-clips-and-t5"],
)
def test_family_of_sai_single_file_keys(text_encoders):
    keys = [MMDIT_KEY, VAE_KEY, *(f"text_encoders.{name}.transformer.text_model.final_layer_norm.weight" for name in text_encoders)]
    assert family_of_single_file(keys) is SD3


def test_a_sd3_single_file_needs_both_clips_but_not_t5():
    clips = [f"text_encoders.{name}.transformer.text_model.final_layer_norm.weight" for name in ("clip_l", "clip_g")]
    check_single_file_parts([MMDIT_KEY, *clips], SD3, "sd3.safetensors")  # T5 is optional
    with pytest.raises(
        UserError,
        match=r"sd3.safetensors has no text_encoder_2 \(text_encoders.clip_g.transformer.\* keys\): SD3 checkpoints need text_encoder and "
        r"text_encoder_2 \(text_encoder_3 is optional\)$",
    ):
        check_single_file_parts([MMDIT_KEY, clips[0]], SD3, "sd3.safetensors")


def test_an_sd3_lora_of_the_clips_alone_is_told_by_its_metadata():
    """CLIP-L/CLIP-G modules have SDXL's shapes: kohya's ss_base_model_version (or the modelspec) says SD3."""
    module = LoraModule(torch.ones(2, 768), torch.ones(768, 2), 1.0)
    modules = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": module,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": module,
    }
    assert family_of_lora(LoraState(dict(modules))) is SDXL
    assert family_of_lora(LoraState(dict(modules), {"ss_base_model_version": "5-large"})) is SD3
    assert family_of_lora(LoraState(dict(modules), {"modelspec.architecture": "stable-diffusion-3-5-medium/lora"})) is SD3
    assert family_of_lora(LoraState({"transformer.proj_out": module})) is SD3
    clip_l = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": module}  # SD1's shapes
    assert family_of_lora(LoraState(dict(clip_l))) is SD1
    assert family_of_lora(LoraState(dict(clip_l), {"ss_base_model_version": "medium"})) is SD3


def test_tiny_sd3_is_deterministic_with_asymmetric_widths(tiny_sd3_pipe):
    pipe = tiny_sd3_pipe
    again = build_tiny_sd3_pipeline()
    for component in SD3.components:
        ours, theirs = getattr(pipe, component).state_dict(), getattr(again, component).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), component
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size, pipe.text_encoder_3.config.d_model)
    config = pipe.transformer.config
    attention = config.num_attention_heads * config.attention_head_dim
    assert widths == (32, 48, 96) and attention == 40 and config.joint_attention_dim == 96
    assert config.pooled_projection_dim == 32 + 48 and config.num_layers == 3
    blocks = pipe.transformer.transformer_blocks
    assert [block.attn2 is not None for block in blocks] == [True, False, False]  # SD3.5 Medium's attn2 on block 0
    assert [block.context_pre_only for block in blocks] == [False, False, True]  # the last block's context has no MLP
    assert blocks[2].norm1_context.linear.weight.shape == (2 * attention, attention)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor != 0


def test_tiny_sd3_folder_loads_back_as_an_sd3_pipeline(tiny_sd3_dir, tiny_sd3_pipe):
    pipe = load_pipeline(str(tiny_sd3_dir))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    for component in ("transformer", "text_encoder_3"):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(tiny_sd3_pipe, component).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), component
    assert pipe.tokenizer_3("a photo of a cat").input_ids == tiny_sd3_pipe.tokenizer_3("a photo of a cat").input_ids
