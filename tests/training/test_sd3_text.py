"""Tests for sdlora/training/cache.py's SD3 text conditioning: equal to StableDiffusion3Pipeline.encode_prompt on
the tiny SD3 model, with and without T5, at the T5 length asked for; the per-encoder dropout's zeros and draws."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import torch

from sdlora.core.families import SD3
from sdlora.training.cache import draw_encoder_dropout, encode_captions, zero_dropped_encoders

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


# ---------------------------------------------------------------- per-encoder dropout (kohya's clip_l/clip_g/t5 rates)


def test_dropped_encoders_parts_are_zero_as_kohyas_and_the_rest_untouched(tiny_sd3_pipe):
    pipe, t5_length = tiny_sd3_pipe, 20
    model = SimpleNamespace(pipe=pipe, family=SD3, t5_max_length=t5_length)  # what zero_dropped_encoders reads of the run's model
    with torch.no_grad():
        hidden, pooled = encode_captions(pipe, _encoders(pipe), SD3, CAPTIONS, "cpu", t5_max_length=t5_length)
        without_t5, _ = encode_captions(pipe, _encoders(pipe, with_t5=False), SD3, CAPTIONS, "cpu", t5_max_length=t5_length)
    original = hidden.clone()
    dropped = [frozenset({"text_encoder"}), frozenset({"text_encoder_2", "text_encoder_3"}), frozenset()]
    got_hidden, got_pooled = zero_dropped_encoders(model, hidden, pooled, dropped)
    # kohya's drop_cached_text_encoder_outputs on this layout: CLIP-L is the first 32 columns of the CLIP tokens and of
    # the pooled embedding, CLIP-G the next 48 (the tiny model's widths), T5 every column of its tokens
    clip = pipe.tokenizer.model_max_length
    expected_hidden, expected_pooled = hidden.clone(), pooled.clone()
    expected_hidden[0, :clip, :32], expected_pooled[0, :32] = 0, 0
    expected_hidden[1, :clip, 32:80], expected_pooled[1, 32:80] = 0, 0
    expected_hidden[1, clip:] = 0
    assert torch.equal(got_hidden, expected_hidden) and torch.equal(got_pooled, expected_pooled)
    assert hidden[0, :clip, :32].abs().sum() > 0 and hidden[1, clip:].abs().sum() > 0  # there was something to zero
    assert torch.equal(got_hidden[1, clip:], without_t5[1, clip:])  # T5 dropped = the pipeline without T5
    assert torch.equal(got_hidden[2], hidden[2]) and torch.equal(got_pooled[2], pooled[2])
    assert torch.equal(hidden, original)  # the input (a cache's entry) is not written
    assert zero_dropped_encoders(model, hidden, pooled, [frozenset()] * 3)[0] is hidden  # nothing dropped: no copy


def test_encoder_dropout_draws_follow_each_rate_independently_and_the_seed():
    rates = {"text_encoder": 0.1, "text_encoder_2": 0.5, "text_encoder_3": 0.8}
    count = 20_000
    draws = draw_encoder_dropout(rates, count, random.Random(7))
    for component, rate in rates.items():
        frequency = sum(component in parts for parts in draws) / count
        assert abs(frequency - rate) < 4.5 * math.sqrt(rate * (1 - rate) / count), (component, frequency)
    both = sum({"text_encoder", "text_encoder_3"} <= parts for parts in draws) / count  # independent: 0.1 * 0.8
    assert abs(both - 0.08) < 4.5 * math.sqrt(0.08 * 0.92 / count)
    assert draws[:50] == draw_encoder_dropout(rates, 50, random.Random(7))  # the step's seed decides: resume redraws the same
    assert draw_encoder_dropout({"text_encoder": 1.0}, 3, random.Random(0)) == [frozenset({"text_encoder"})] * 3
