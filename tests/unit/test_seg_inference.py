"""Whole-image inference: any size in, exactly that size out; batching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.network import NetworkConfig, build_network
from segmentation.tiled_inference import overall_score, segment_images, segmentation_from_probabilities


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_network(NetworkConfig(n_classes=3, channels=(8, 16, 32, 64, 128))).eval()


@pytest.mark.parametrize("height,width", [(1, 1), (17, 33), (100, 7), (257, 130), (530, 301)])
def test_exact_output_size(network, height, width):
    image = np.random.default_rng(height).integers(0, 255, (height, width, 3)).astype(np.uint8)
    (result,) = segment_images(network, [image], torch.device("cpu"), tile=256)
    assert result.mask.shape == (height, width) and result.mask.dtype == np.uint8
    assert result.confidence.shape == (height, width)
    assert result.mask.max() < 3
    assert 0.0 < result.score <= 1.0


def test_batched_equals_single(network):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, shape).astype(np.uint8) for shape in [(40, 50, 3), (40, 50, 3), (33, 20, 3)]]
    batched = segment_images(network, images, torch.device("cpu"), batch_size=4)
    single = [segment_images(network, [image], torch.device("cpu"))[0] for image in images]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-4)


def test_confidences_and_score():
    probs = np.zeros((3, 2, 3), np.float32)
    probs[0] = [[1.0, 1.0, 0.6], [0.2, 0.1, 1.0]]
    probs[1] = [[0.0, 0.0, 0.4], [0.8, 0.1, 0.0]]
    probs[2] = 1.0 - probs[0] - probs[1]
    result = segmentation_from_probabilities(probs)
    assert result.mask.tolist() == [[0, 0, 0], [1, 2, 0]]
    assert result.class_confidence == pytest.approx({1: 0.8, 2: 0.8})
    # Relevant pixels (foreground >= 10 %): (0,2) conf 0.6, (1,0) 0.8, (1,1) 0.8.
    assert result.score == pytest.approx((0.6 + 0.8 + 0.8) / 3)
    empty = np.zeros((2, 2, 2), np.float32)
    empty[0] = 0.95
    empty[1] = 0.05
    assert overall_score(empty, empty.max(axis=0)) == pytest.approx(0.95)
