"""Mask post-processing (confidence floor, small components, small holes) and label maps: pure
functions, small arrays, exact expected results."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.label_map import merge_classes, parse_label_map
from segmentation.postprocess import Cleaning, class_confidences, clean_mask, clean_segmentation
from segmentation.tiled_inference import Segmentation


def sure(mask: np.ndarray) -> np.ndarray:
    return np.ones(mask.shape, np.float32)


def test_nothing_to_do_leaves_the_mask_as_it_was():
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    assert np.array_equal(clean_mask(mask, sure(mask), Cleaning()), mask)


def test_the_confidence_floor_turns_doubtful_pixels_into_background():
    mask = np.array([[1, 1, 2], [2, 0, 1]], np.uint8)
    confidence = np.array([[0.9, 0.4, 0.7], [0.55, 0.99, 0.2]], np.float16)
    cleaned = clean_mask(mask, confidence, Cleaning(min_confidence=0.5))
    assert cleaned.tolist() == [[1, 0, 2], [2, 0, 0]]
    assert mask.tolist() == [[1, 1, 2], [2, 0, 1]]  # the input is not changed


def test_small_components_are_dropped_large_ones_kept():
    mask = np.zeros((10, 10), np.uint8)
    mask[1:4, 1:4] = 1  # 9 px
    mask[7, 7] = 1  # a 1-px speck
    mask[6:8, 1:3] = 2  # 4 px of another class
    mask[0, 9] = 2
    mask[1, 8] = 2  # touches (0, 9) diagonally: one 8-connected component of 2 px
    cleaned = clean_mask(mask, sure(mask), Cleaning(min_component_px=3))
    expected = mask.copy()
    expected[7, 7] = 0
    expected[0, 9] = expected[1, 8] = 0
    assert np.array_equal(cleaned, expected)


def test_small_holes_are_filled_large_ones_and_border_gaps_kept():
    mask = np.zeros((12, 12), np.uint8)
    mask[1:11, 1:11] = 1
    mask[3, 3] = 0  # 1-px hole
    mask[5:9, 5:9] = 0  # 16-px hole
    mask[6, 6] = 2  # another class's speck inside the large hole
    mask[2, 8] = 2  # another class filling a 1-px hole
    cleaned = clean_mask(mask, sure(mask), Cleaning(fill_holes_px=5))
    expected = mask.copy()
    expected[3, 3] = 1
    expected[2, 8] = 1
    expected[6, 6] = 2  # inside a hole of 16 px: left as it is... and class 2's own surroundings
    assert np.array_equal(cleaned, expected)
    # The background around the object touches the border: never a hole, however small the image.
    edge = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]], np.uint8)
    assert np.array_equal(clean_mask(edge, sure(edge), Cleaning(fill_holes_px=100)), edge)


def test_a_speck_of_another_class_inside_an_object_is_dropped_then_filled():
    mask = np.ones((9, 9), np.uint8)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 0
    mask[4, 4] = 2
    cleaned = clean_mask(mask, sure(mask), Cleaning(min_component_px=2, fill_holes_px=2))
    assert (cleaned[1:-1, 1:-1] == 1).all() and cleaned.max() == 1


def test_clean_segmentation_recomputes_each_class_mean_confidence():
    mask = np.array([[1, 1, 0], [0, 2, 2]], np.uint8)
    confidence = np.array([[0.9, 0.3, 1.0], [1.0, 0.8, 0.6]], np.float16)
    segmentation = Segmentation(mask, confidence, {1: 0.6, 2: 0.7}, score=0.5)
    cleaned = clean_segmentation(segmentation, Cleaning(min_confidence=0.5))
    assert cleaned.mask.tolist() == [[1, 0, 0], [0, 2, 2]]
    assert cleaned.class_confidence == pytest.approx({1: 0.9, 2: 0.7}, abs=1e-3)
    assert cleaned.score == 0.5
    assert class_confidences(np.zeros((2, 2), np.uint8), np.ones((2, 2))) == {}


def test_label_map_parsing_and_refusals():
    assert parse_label_map(" Upper-clothes = Top , pants=Trousers,") == {"upper-clothes": "Top", "pants": "Trousers"}
    assert parse_label_map("") == {}
    for bad in ("Top", "=Top", "Pants=", "a=b,A=c"):
        with pytest.raises(ValueError):
            parse_label_map(bad)


def test_merge_classes_with_a_map_drops_unmapped_classes_and_merges_several():
    id2label = {0: "Background", 1: "Upper-clothes", 2: "Left-shoe", 3: "Right-shoe", 4: "Hair"}
    labels, target = merge_classes(id2label, parse_label_map("upper-clothes=Top,Left-shoe=Shoe,Right-shoe=Shoe"))
    assert labels == ("Top", "Shoe")
    assert target == [0, 1, 2, 2, 0]


def test_merge_classes_without_a_map_keeps_names_but_not_background():
    labels, target = merge_classes({0: "background", 1: "Nucleus", 2: "Cell"}, {})
    assert labels == ("Nucleus", "Cell") and target == [0, 1, 2]
