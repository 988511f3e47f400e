"""The style classifier: the shipped one separates the three styles on held-out procedural renderings, and
fitting is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora.demo.style import CLASSIFIER_FILE, FIT_START, TEST_START, accuracy, fit, load_classifier, renderings
from sdlora.drawing.styles import STYLE_NAMES


@pytest.fixture(scope="module")
def held_out():
    return renderings(40, TEST_START + 500)  # blurred and noised, as generated pictures are; never fitted on


def test_shipped_classifier_separates_the_three_styles_on_held_out_renderings(held_out):
    share, confusion = accuracy(load_classifier(), *held_out)
    assert share >= 0.95, confusion
    assert (np.diag(confusion) >= 0.9 * confusion.sum(axis=1)).all(), confusion  # no style much worse than the rest


def test_classify_takes_pil_images_of_any_size_and_names_styles(held_out):
    from PIL import Image

    pictures, labels = held_out
    classifier = load_classifier()
    expected = classifier.classify(pictures)
    assert classifier.classify([Image.fromarray(picture) for picture in pictures]) == expected
    assert set(expected) == set(STYLE_NAMES)
    # pictures of another size are resized to 64 first: a 2x nearest-neighbour copy mostly classifies as the original
    doubled = [Image.fromarray(picture).resize((128, 128), Image.Resampling.NEAREST) for picture in pictures]
    assert np.mean([a == b for a, b in zip(classifier.classify(doubled), expected)]) >= 0.9


@pytest.mark.slow
def test_fitting_is_deterministic():
    pictures, labels = renderings(12, FIT_START)
    first, second = fit(pictures, labels, epochs=1), fit(pictures, labels, epochs=1)
    for (key, a), b in zip(first.network.state_dict().items(), second.network.state_dict().values()):
        assert torch.equal(a, b), key
    assert CLASSIFIER_FILE.is_file()
