"""The `sam` engine's fast image encoder (SDPA attention, batches) computes what segment-anything does.

Tolerances (issue 13): embeddings cosine >= 0.9999 and masks IoU >= 0.99 on a fixed set of prompts,
random weights. The relative-position tables are randomised too: segment-anything initialises them
to zero, which would hide a wrong bias.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam.engines.segment_anything_engine import SamEngine, save_random_checkpoint
from sam.engines.segment_anything_loader import load_segment_anything
from tests.support.masks import iou

PROMPTS = [
    dict(box=[20, 15, 90, 70]),
    dict(box=[5, 5, 120, 85]),
    dict(points=[[60, 40]], point_labels=[1]),
    dict(points=[[60, 40], [100, 20]], point_labels=[1, 0]),
    dict(box=[30, 20, 80, 60], points=[[55, 40]], point_labels=[1]),
]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    shapes = [(90, 130), (128, 96), (64, 64)]
    result = []
    for height, width in shapes:
        rows, cols = np.mgrid[:height, :width]
        smooth = 127 + 80 * np.sin(rows / 9.0) * np.cos(cols / 13.0)
        noisy = smooth[:, :, None] + rng.normal(0, 20, (height, width, 3))
        result.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint whose relative-position tables are not zero."""
    path = save_random_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", "vit_tiny", seed=3)
    state = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(5)
    for name, tensor in state.items():
        if "rel_pos" in name:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def engines(checkpoint):
    original = SamEngine(checkpoint=checkpoint, model_type="vit_tiny", device="cpu", bf16=False, sdpa=False)
    fast = SamEngine(checkpoint=checkpoint, model_type="vit_tiny", device="cpu", bf16=False, sdpa=True)
    return original, fast


def test_sdpa_attention_replaces_every_attention_block(engines):
    _, fast = engines
    kinds = {type(m).__name__ for m in fast.model.image_encoder.modules() if hasattr(m, "qkv")}
    assert kinds == {"SdpaAttention"}


def test_sdpa_encoder_matches_segment_anything_set_image(checkpoint, engines):
    """The reference is segment-anything's own SamPredictor.set_image on the unmodified model."""
    original, fast = engines
    predictor = load_segment_anything().SamPredictor(original.model)
    for image in images():
        with torch.inference_mode():
            predictor.set_image(image)
        reference = predictor.features
        embedding = fast.embed(image)
        assert embedding.original_size == tuple(predictor.original_size)
        assert embedding.input_size == tuple(predictor.input_size)
        assert cosine(embedding.features, reference) >= 0.9999
        assert torch.allclose(embedding.features, reference, atol=1e-4, rtol=1e-4)


def test_sdpa_masks_match_the_original_encoder_on_fixed_prompts(engines):
    original, fast = engines
    image = images()[0]
    slow_embedding, fast_embedding = original.embed(image), fast.embed(image)
    for prompt in PROMPTS:
        slow_mask, slow_score = original.predict(slow_embedding, **prompt)
        fast_mask, fast_score = fast.predict(fast_embedding, **prompt)
        assert iou(slow_mask, fast_mask) >= 0.99, prompt
        assert abs(slow_score - fast_score) < 1e-3


def test_a_batch_of_images_of_different_sizes_embeds_like_one_at_a_time(engines):
    _, fast = engines
    batch = fast.embed_batch(images())
    for image, embedding in zip(images(), batch, strict=True):
        single = fast.embed(image)
        assert embedding.original_size == single.original_size
        assert embedding.input_size == single.input_size
        assert cosine(embedding.features, single.features) >= 0.9999
        # each embedding owns its memory: the cache's byte count is what it holds
        assert embedding.features.untyped_storage().nbytes() == fast.embedding_nbytes(embedding)


def test_bf16_sdpa_stays_close_to_fp32_original(checkpoint, engines):
    original, _ = engines
    fast_bf16 = SamEngine(checkpoint=checkpoint, model_type="vit_tiny", device="cpu", bf16=True, sdpa=True)
    image = images()[1]
    assert cosine(fast_bf16.embed(image).features, original.embed(image).features) >= 0.999
