"""Pure parts of issue 10: refinement memory, text prompts and the output choice."""

from __future__ import annotations

import numpy as np
import pytest

from backends.errors import BadRequest
from sam.embedding_cache import ByteLRU
from sam.outputs import choose_outputs
from sam.prompts import Prompt
from sam.refinement import Refinement, RefinementMemory, region_key
from sam.text_prompts import label_for_text, parse_synonyms, phrases_for, text_prompts

BOX = (10.0, 20.0, 60.0, 80.0)


def memory(capacity=10 * 2**20):
    return RefinementMemory(ByteLRU(capacity, sizeof=lambda value: value.nbytes))


def test_an_added_click_gets_the_regions_previous_logits():
    refinements = memory()
    first = Prompt("Cell", "image", BOX)
    logits = np.full((256, 256), 3.0, np.float32)
    assert refinements.previous_logits("1:a.png", first) is None
    refinements.remember("1:a.png", first, logits)
    clicked = Prompt("Cell", "image", BOX, ((30.0, 40.0),), (0,))
    assert refinements.previous_logits("1:a.png", clicked) is logits


def test_logits_are_reused_only_when_the_earlier_clicks_come_first():
    refinements = memory()
    two = Prompt("Cell", "image", BOX, ((30.0, 40.0), (35.0, 45.0)), (1, 0))
    refinements.remember("1:a.png", two, np.zeros((256, 256), np.float32))
    same = two
    changed = Prompt("Cell", "image", BOX, ((31.0, 40.0), (35.0, 45.0), (40.0, 50.0)), (1, 0, 1))
    other_box = Prompt("Cell", "image", (11.0, 20.0, 60.0, 80.0), two.points + ((40.0, 50.0),), (1, 0, 1))
    other_image = Prompt("Cell", "image", BOX, two.points + ((40.0, 50.0),), (1, 0, 1))
    assert refinements.previous_logits("1:a.png", same) is None  # no new click: decode afresh
    assert refinements.previous_logits("1:a.png", changed) is None
    assert refinements.previous_logits("1:a.png", other_box) is None
    assert refinements.previous_logits("2:b.png", other_image) is None
    assert refinements.previous_logits("1:a.png", other_image) is not None


def test_clicks_without_a_box_are_anchored_at_the_first_positive_click():
    a = Prompt("Cell", "image", None, ((5.0, 5.0), (9.0, 9.0)), (0, 1))
    b = Prompt("Cell", "image", None, ((5.0, 5.0), (9.0, 9.0), (12.0, 3.0)), (0, 1, 0))
    assert region_key("1:a", a) == region_key("1:a", b)
    assert "points:9.00,9.00" in region_key("1:a", a)


def test_refinements_share_the_byte_cap_and_leave_by_lru():
    refinements = memory(capacity=3 * 256 * 1024)
    prompts = [Prompt("Cell", "image", (float(i), 0.0, 50.0, 50.0)) for i in range(5)]
    for prompt in prompts:
        refinements.remember("1:a", prompt, np.zeros((256, 256), np.float32))
    cache = refinements._cache
    assert cache.bytes <= 3 * 256 * 1024 and len(cache) == 3
    assert isinstance(cache.get(region_key("1:a", prompts[-1])), Refinement)
    assert cache.get(region_key("1:a", prompts[0])) is None


def test_text_prompts_come_from_textarea_regions():
    regions = [
        {"type": "rectanglelabels", "value": {"x": 1}},
        {"type": "textarea", "value": {"text": ["  nucleus "]}, "to_name": "image"},
    ]
    [prompt] = text_prompts(regions)
    assert (prompt.text, prompt.to_name) == ("nucleus", "image")


@pytest.mark.parametrize("value", [{"text": []}, {"text": [""]}, {"text": [3]}, {}, {"text": ["x" * 201]}])
def test_malformed_or_empty_text_prompts_are_refused_with_a_message(value):
    with pytest.raises(BadRequest, match="text prompt"):
        text_prompts([{"type": "textarea", "value": value}])


def test_the_text_picks_the_label_by_name_or_synonym():
    synonyms = parse_synonyms("Top=shirt|blouse; Trousers = pants")
    assert synonyms == {"Top": ("shirt", "blouse"), "Trousers": ("pants",)}
    labels = ["Top", "Trousers", "Nucleus"]
    assert label_for_text("NUCLEUS", labels, synonyms) == "Nucleus"
    assert label_for_text("Blouse", labels, synonyms) == "Top"
    assert label_for_text("anything", ["Cell"], {}) == "Cell"
    with pytest.raises(BadRequest, match="names none of the labels"):
        label_for_text("dog", labels, synonyms)
    assert phrases_for("Top", synonyms) == ("shirt", "blouse")
    assert phrases_for("Nucleus", synonyms) == ("Nucleus",)


@pytest.mark.parametrize("setting", ["Top", "=shirt", "Top="])
def test_malformed_synonyms_are_refused(setting):
    with pytest.raises(ValueError, match="SAM_TEXT_SYNONYMS"):
        parse_synonyms(setting)


def test_one_kind_of_region_per_prompt_unless_both_are_asked_for():
    assert choose_outputs("brush", "polygon", "auto") == ["brush"]
    assert choose_outputs(None, "polygon", "auto") == ["polygon"]
    assert choose_outputs("brush", "polygon", "polygon") == ["polygon"]
    assert choose_outputs("brush", None, "polygon") == ["brush"]
    assert choose_outputs("brush", "polygon", "both") == ["brush", "polygon"]
    with pytest.raises(ValueError, match="SAM_OUTPUT"):
        choose_outputs("brush", None, "mask")
