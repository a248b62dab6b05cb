"""A briefly trained U-Net's masks have no periodic pattern of 1-pixel holes (checkerboard).

monai's transposed convolution (kernel 3, stride 2) made them: on these disks, 60 steps of batch
4, 1-pixel holes were 0.32 % and 3.05 % of the predicted pixels (seeds 0 and 1); with the
resize-convolution up path 0.000 % for both (measured on the 2-core CPU, Nov 2026).
"""

from __future__ import annotations

import numpy as np

from segmentation.families import build
from segmentation.network import NetworkConfig
from segmentation.tiled_inference import segment_images
from segmentation.trainer import TrainConfig, fit
from tests.unit.test_seg_training import disks_sample


def one_pixel_holes(mask: np.ndarray) -> float:
    """Fraction of the predicted (non-background) pixels that are 1-pixel holes: background
    pixels whose four neighbours are all foreground."""
    foreground = mask > 0
    hole = ~foreground[1:-1, 1:-1]
    for shifted in (foreground[:-2, 1:-1], foreground[2:, 1:-1], foreground[1:-1, :-2], foreground[1:-1, 2:]):
        hole &= shifted
    return float(hole.sum() / max(foreground.sum(), 1))


def test_the_measure_sees_a_checkerboard():
    mask = np.ones((20, 20), np.uint8)
    mask[1:-1:2, 1:-1:2] = 0
    assert one_pixel_holes(mask) > 0.2


def test_a_briefly_trained_unet_has_no_one_pixel_holes(one_thread):
    rng = np.random.default_rng(0)
    samples = [disks_sample(f"s{i}", rng, 128, 128) for i in range(8)]
    test = [disks_sample(f"t{i}", rng, 160, 160) for i in range(4)]
    config = TrainConfig(
        minutes=5, max_epochs=6, steps_per_epoch=10, batch_size=4, crop_size=64, device="cpu", seed=1, patience=None
    )
    trained = fit(samples, ["red", "green"], config)
    assert isinstance(trained.network, NetworkConfig) and trained.network.upsample == "resize"
    network = build(trained.network)
    network.load_state_dict(trained.state_dict)
    predictions = segment_images(network, [sample.image for sample in test], "cpu")
    assert all(p.mask.any() for p in predictions)
    holes = [one_pixel_holes(p.mask) for p in predictions]
    assert max(holes) < 0.005, holes
