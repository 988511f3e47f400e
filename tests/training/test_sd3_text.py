"""Tests for sdlora/training/cache.py's SD3 text conditioning: equal to StableDiffusion3Pipeline.encode_prompt on
the tiny SD3 model, with and without T5, at the T5 length asked for."""

from __future__ import annotations

import torch

from sdlora.core.families import SD3
from sdlora.training.cache import encode_captions

CAPTIONS = ["a red circle on grass", "", "three blue squares under a wide yellow sky at noon"]


def _encoders(pipe, with_t5: bool = True) -> dict:
    parts = ("text_encoder", "text_encoder_2", "text_encoder_3") if with_t5 else ("text_encoder", "text_encoder_2")
    return {part: getattr(pipe, part) for part in parts}


def test_sd3_text_equals_the_pipelines_encode_prompt(tiny_sd3_pipe):
    pipe = tiny_sd3_pipe
    with torch.no_grad():
        hidden, pooled = encode_captions(pipe, _encoders(pipe), SD3, CAPTIONS, "cpu", t5_max_length=20)
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=20, device="cpu"
        )
    clip_tokens = pipe.tokenizer.model_max_length
    assert hidden.shape == (3, clip_tokens + 20, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (3, pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(hidden, expected) and torch.equal(pooled, expected_pooled)
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert torch.all(hidden[:, :clip_tokens, clip_width:] == 0) and hidden[:, clip_tokens:].abs().sum() > 0


def test_sd3_text_without_t5_has_zeros_in_its_slot_as_the_pipeline(tiny_sd3_pipe):
    pipe = tiny_sd3_pipe
    with torch.no_grad():
        hidden, pooled = encode_captions(pipe, _encoders(pipe, with_t5=False), SD3, CAPTIONS, "cpu", t5_max_length=12)
        text_encoder_3, pipe.text_encoder_3 = pipe.text_encoder_3, None
        try:
            expected, _, expected_pooled, _ = pipe.encode_prompt(
                CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=12, device="cpu"
            )
        finally:
            pipe.text_encoder_3 = text_encoder_3
    assert torch.equal(hidden, expected) and torch.equal(pooled, expected_pooled)
    assert torch.all(hidden[:, pipe.tokenizer.model_max_length :] == 0)
