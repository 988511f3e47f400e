"""families.py: the family table, and detection from a pipeline, a folder, a UNet config, single-file keys, a LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora.core import families
from sdlora.core.families import (
    SD1,
    SD2,
    SDXL,
    family_of_folder,
    family_of_lora,
    family_of_pipeline,
    family_of_single_file,
    family_of_unet_config,
)
from sdlora.core.formats.names import KOHYA_PREFIXES
from sdlora.core.state import LoraModule, LoraState


def test_the_table_says_what_differs():
    assert [f.name for f in families.FAMILIES] == ["sd1", "sd2", "sdxl", "sd3"]
    assert SD1.components == SD2.components == ("unet", "text_encoder")
    assert SDXL.components == ("unet", "text_encoder", "text_encoder_2")
    assert SDXL.required_parts == ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    assert (SD1.pipeline_class, SDXL.pipeline_class) == ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    # SDXL reads the penultimate layer of both encoders and the pooled embedding of the second
    assert [(s.hidden_layer, s.pooled) for s in SDXL.text_encoders] == [(-2, False), (-2, True)]
    assert [s.single_file_layout for s in SDXL.text_encoders] == ["hf", "openclip"]
    assert (SD1.kohya_unet_names, SDXL.kohya_unet_names) == ("diffusers", "ldm")
    assert {f.ss_base_model_version for f in families.FAMILIES} == {"sd_v1", "sd_v2", "sdxl_base_v1-0", "medium"}
    with pytest.raises(ValueError, match="SD1.x models have no text_encoder_2"):
        SD1.text_encoder("text_encoder_2")
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        families.family_by_name("flux")


def test_kohya_prefixes_are_read_from_the_family_table():
    assert KOHYA_PREFIXES == {
        "lora_unet_": "unet",
        "lora_te_": "text_encoder",
        "lora_te1_": "text_encoder",
        "lora_te2_": "text_encoder_2",
        "lora_te3_": "text_encoder_3",  # SD3's T5
        "lora_transformer_": "transformer",  # OneTrainer's SD3 (diffusers' names)
        "lycoris_": "transformer",  # SimpleTuner's SD3 LyCORIS (diffusers' names)
    }


def test_family_of_the_tiny_pipeline_and_its_folder(tiny_pipe, tiny_model_dir):
    assert family_of_pipeline(tiny_pipe) is SD1  # cross-attention 32: SD1's architecture in miniature
    assert family_of_folder(tiny_model_dir) is SD1


@pytest.mark.parametrize(
    ("config", "family"),
    [({"cross_attention_dim": 768}, SD1), ({"cross_attention_dim": 1024}, SD2), ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, SDXL),
     ({"cross_attention_dim": 80, "addition_embed_type": "text_time"}, SDXL)],
    ids=["sd1", "sd2", "sdxl", "tiny-sdxl"],
)  # fmt: skip
def test_family_of_a_unet_config(config, family):
    assert family_of_unet_config(config) is family


def test_family_of_a_folder_reads_the_index_then_the_unet(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    assert family_of_folder(tmp_path) is SD2
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert family_of_folder(tmp_path) is SDXL
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model_index.json is not a JSON object"):
        family_of_folder(tmp_path)


@pytest.mark.parametrize(
    ("key", "family"),
    [("cond_stage_model.transformer.text_model.embeddings.position_ids", SD1), ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", SD2),
     ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", SDXL), ("model.diffusion_model.out.2.weight", SD1)],
    ids=["sd1", "sd2", "sdxl", "unet-only"],
)  # fmt: skip
def test_family_of_single_file_keys(key, family):
    assert family_of_single_file(["model.diffusion_model.input_blocks.0.0.weight", key]) is family


def test_a_single_file_without_a_unet_is_no_stable_diffusion_checkpoint():
    with pytest.raises(ValueError, match="not a Stable Diffusion single-file checkpoint"):
        family_of_single_file(["encoder.weight"])


def _lora(path: str, width: int) -> LoraState:
    return LoraState({path: LoraModule(torch.zeros(4, width), torch.zeros(8, 4), 8.0)})


def test_family_of_a_lora_from_its_shapes():
    assert family_of_lora(_lora("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 768)) is SD1
    assert family_of_lora(_lora("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 1024)) is SD2
    assert family_of_lora(_lora("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280)) is SDXL
    assert family_of_lora(_lora("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 32)) is None  # tiny
