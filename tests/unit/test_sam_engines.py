"""The engines: classic (weight-free), sam (tiny random checkpoint), custom loading, the torchvision-free import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from backends.settings import Settings
from sam.engines import embedding_nbytes, load_engine
from sam.engines.classic import ClassicEngine
from sam.engines.segment_anything_loader import ResizeLongestSide
from tests.support.masks import iou


def disk_image(height=120, width=160, centre=(70, 60), radius=25, bright=200, dark=30):
    """RGB image with one bright disk (centre XY) on a dark noisy background, and its mask."""
    rng = np.random.default_rng(0)
    rows, cols = np.ogrid[:height, :width]
    mask = (cols - centre[0]) ** 2 + (rows - centre[1]) ** 2 <= radius**2
    gray = np.where(mask, bright, dark) + rng.normal(0, 8, (height, width))
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, mask


# -- classic ------------------------------------------------------------------------------------


def test_classic_box_on_synthetic_disk():
    image, truth = disk_image()
    engine = ClassicEngine()
    mask, score = engine.predict(engine.embed(image), box=[45, 35, 96, 86])
    assert mask.shape == truth.shape and mask.dtype == bool
    assert iou(mask, truth) > 0.9
    assert 0.0 <= score <= 1.0


def test_classic_dark_object_on_bright_background():
    image, truth = disk_image(bright=40, dark=220)
    engine = ClassicEngine()
    mask, _ = engine.predict(engine.embed(image), box=[45, 35, 96, 86])
    assert iou(mask, truth) > 0.9


def test_classic_points_only_and_negative_point():
    image, truth = disk_image()
    engine = ClassicEngine()
    embedding = engine.embed(image)
    mask, _ = engine.predict(embedding, points=[[70, 60]], point_labels=[1])
    assert iou(mask, truth) > 0.85
    # a negative click on the background changes nothing; one on the object removes it
    same, _ = engine.predict(embedding, points=[[70, 60], [10, 10]], point_labels=[1, 0])
    assert iou(same, mask) > 0.95
    with pytest.raises(ValueError):
        engine.predict(embedding, points=[[10, 10]], point_labels=[0])


def test_classic_box_outside_object_gives_mask_inside_box_only():
    image, _ = disk_image()
    engine = ClassicEngine()
    mask, _ = engine.predict(engine.embed(image), box=[0, 0, 20, 20])
    assert not mask[:, 21:].any() and not mask[21:, :].any()


def test_classic_large_image_stays_fast():
    import time

    image, truth = disk_image(height=2000, width=3000, centre=(1500, 1000), radius=600)
    engine = ClassicEngine()
    embedding = engine.embed(image)
    started = time.perf_counter()
    mask, _ = engine.predict(embedding, box=[900, 400, 2101, 1601])
    assert time.perf_counter() - started < 2.0  # downscaled crop: well under a second here
    assert iou(mask, truth) > 0.9


def test_classic_beats_filled_box_on_dsb2018_nuclei(shared_data):
    from scipy import ndimage as ndi

    engine = ClassicEngine()
    ids = sorted(p.stem for p in (shared_data / "dsb2018" / "images").glob("*.png"))[-6:]
    engine_ious, box_ious = [], []
    for image_id in ids:
        image = np.array(Image.open(shared_data / "dsb2018" / "images" / f"{image_id}.png").convert("RGB"))
        labels = np.array(Image.open(shared_data / "dsb2018" / "labels" / f"{image_id}.png"))
        embedding = engine.embed(image)
        for index, found in enumerate(ndi.find_objects(labels)[:8]):
            if found is None:
                continue
            truth = labels == index + 1
            box = [found[1].start, found[0].start, found[1].stop, found[0].stop]
            mask, _ = engine.predict(embedding, box=box)
            filled = np.zeros_like(truth)
            filled[found] = True
            engine_ious.append(iou(mask, truth))
            box_ious.append(iou(filled, truth))
    assert len(engine_ious) >= 20
    assert np.mean(engine_ious) > np.mean(box_ious) + 0.05


# -- sam (tiny random checkpoint) --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from sam.engines.segment_anything_engine import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", "vit_tiny")


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    from sam.engines.segment_anything_engine import SamEngine

    return SamEngine(checkpoint=tiny_checkpoint, model_type="vit_tiny", device="cpu")


def test_sam_shapes_and_determinism(tiny_engine):
    image, _ = disk_image(height=90, width=130)
    embedding = tiny_engine.embed(image)
    assert tuple(embedding.features.shape) == (1, 256, 64, 64)
    assert embedding.original_size == (90, 130)
    assert embedding.input_size == (709, 1024)
    assert embedding_nbytes(tiny_engine, embedding) == 256 * 64 * 64 * 4
    mask, score = tiny_engine.predict(embedding, box=[30, 20, 100, 70])
    assert mask.shape == (90, 130) and mask.dtype == bool and isinstance(score, float)
    again = tiny_engine.embed(image)
    assert np.array_equal(tiny_engine.predict(again, box=[30, 20, 100, 70])[0], mask)


def test_sam_box_and_points_paths_differ(tiny_engine):
    image, _ = disk_image(height=90, width=130)
    embedding = tiny_engine.embed(image)
    by_box, _ = tiny_engine.predict(embedding, box=[30, 20, 100, 70])
    by_point, _ = tiny_engine.predict(embedding, points=[[65, 45]], point_labels=[1])
    refined, _ = tiny_engine.predict(embedding, box=[30, 20, 100, 70], points=[[65, 45], [35, 25]], point_labels=[1, 0])
    assert by_point.shape == refined.shape == (90, 130)
    assert not (np.array_equal(by_box, by_point) and np.array_equal(by_box, refined))
    with pytest.raises(ValueError):
        tiny_engine.predict(embedding)


def test_sam_checkpoint_of_wrong_type_is_refused(tiny_checkpoint):
    from sam.engines.segment_anything_engine import build_model

    with pytest.raises(ValueError, match="does not fit"):
        build_model("vit_b", tiny_checkpoint)
    with pytest.raises(ValueError, match="SAM_MODEL_TYPE"):
        build_model("vit_x")


def test_resize_matches_pil_bilinear_and_sam_shape_rule():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    resized = ResizeLongestSide(1024).apply_image(image)
    assert resized.shape == (715, 1024, 3)
    expected = np.array(Image.fromarray(image).resize((1024, 715), Image.BILINEAR))
    assert np.array_equal(resized, expected)
    coords = ResizeLongestSide(1024).apply_coords(np.array([[53.0, 37.0]]), (37, 53))
    assert np.allclose(coords, [[1024.0, 715.0]])


def test_sam_loads_without_torchvision_in_a_clean_process(tiny_checkpoint):
    """Even where `import torchvision` fails, the engine loads and no fake torchvision is registered."""
    script = textwrap.dedent(
        f"""
        import builtins, sys
        real_import = builtins.__import__
        def no_torchvision(name, *args, **kwargs):
            if name == "torchvision" or name.startswith("torchvision."):
                raise RuntimeError("operator torchvision::nms does not exist")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = no_torchvision
        import numpy as np
        from sam.engines.segment_anything_engine import SamEngine
        engine = SamEngine(checkpoint={str(tiny_checkpoint)!r}, model_type="vit_tiny", device="cpu")
        mask, score = engine.predict(engine.embed(np.zeros((40, 50, 3), np.uint8)), box=[5, 5, 30, 30])
        assert mask.shape == (40, 50)
        assert "torchvision" not in sys.modules
        assert "segment_anything.automatic_mask_generator" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


# -- loading by settings -----------------------------------------------------------------------


class CountingEngine:
    """A custom engine with no `name` (the loader names it after its class) whose embedding is a
    dict holding the image (its size is counted through it); only loaded here, never asked."""

    def embed(self, image):
        return {"pixels": np.asarray(image)}

    def predict(self, embedding, box=None, points=None, point_labels=None):
        return np.zeros(embedding["pixels"].shape[:2], bool), 1.0


def test_load_engine_choices(tmp_path, tiny_checkpoint, caplog):
    with caplog.at_level("WARNING"):
        engine = load_engine(Settings(sam_engine="auto", sam_checkpoint=str(tmp_path / "missing.pth")))
    assert isinstance(engine, ClassicEngine)
    assert "classic" in caplog.text
    sam = load_engine(
        Settings(sam_engine="auto", sam_checkpoint=str(tiny_checkpoint), sam_model_type="vit_tiny", device="cpu")
    )
    assert sam.name == "sam-vit_tiny"
    custom = load_engine(Settings(sam_engine=f"{__name__}:CountingEngine"))
    assert isinstance(custom, CountingEngine) and custom.name == "CountingEngine"
    image = np.zeros((10, 10, 3), np.uint8)
    assert embedding_nbytes(custom, custom.embed(image)) == image.nbytes
    with pytest.raises(ValueError, match="cannot import"):
        load_engine(Settings(sam_engine="no_such_module:Engine"))
    with pytest.raises(ValueError, match="expected auto"):
        load_engine(Settings(sam_engine="magic"))


def test_sam_refinement_feeds_the_previous_logits_back_as_mask_input(tiny_engine):
    """An added click decodes with the earlier mask's logits, exactly as SamPredictor does."""
    from sam.engines.segment_anything_loader import load_segment_anything

    image, _ = disk_image(height=90, width=130)
    embedding = tiny_engine.embed(image)
    first = tiny_engine.predict_with_logits(embedding, box=[40, 30, 100, 80])
    assert first.logits.shape == (256, 256) and first.logits.dtype == np.float32
    points, labels = [[70, 55], [45, 35]], [1, 0]
    refined = tiny_engine.predict_with_logits(embedding, [40, 30, 100, 80], points, labels, mask_input=first.logits)
    fresh = tiny_engine.predict_with_logits(embedding, [40, 30, 100, 80], points, labels)
    assert not np.array_equal(refined.logits, fresh.logits)  # the previous mask reached the decoder

    predictor = load_segment_anything().SamPredictor(tiny_engine.model)
    predictor.features, predictor.is_image_set = embedding.features, True
    predictor.original_size, predictor.input_size = embedding.original_size, embedding.input_size
    masks, scores, _ = predictor.predict(
        point_coords=np.array(points, np.float32),
        point_labels=np.array(labels),
        box=np.array([40, 30, 100, 80], np.float32),
        mask_input=first.logits[None],
        multimask_output=False,
    )
    assert np.array_equal(refined.mask, masks[0]) and refined.score == float(scores[0])
