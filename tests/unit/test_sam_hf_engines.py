"""The transformers engines `sam2` and `sam3` with tiny randomly initialised checkpoints.

Checked: engine choice by checkpoint; coordinates from original pixels to the model frame and
back for any aspect ratio; masks equal to a direct transformers call on the same input, bit for
bit; refinement through `mask_input`; SAM 3 text prompts (one result per instance above the
threshold); embed / predict / text at the same time from several threads; safe loading.
Nothing is downloaded (HF_HUB_OFFLINE): every checkpoint is written to a temp dir here.
"""

from __future__ import annotations

import concurrent.futures
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends.errors import BadRequest
from backends.settings import Settings
from sam.engines import embedding_nbytes, hf_common, load_engine
from sam.engines.hf_testing import save_random_sam2, save_random_sam3

SHAPES = [(90, 130), (130, 90), (64, 64), (40, 200)]  # (H, W): landscape, portrait, square, 5:1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return SimpleNamespace(
        sam2=save_random_sam2(root / "sam2-tiny"),
        sam2_video=save_random_sam2(root / "sam2-video-tiny", video=True, seed=1),
        sam3=save_random_sam3(root / "sam3-tiny"),
        sam3_tracker=save_random_sam3(root / "sam3-tracker-tiny", with_detector=False, seed=2),
    )


@pytest.fixture(scope="module")
def sam2(checkpoints):
    from sam.engines.hf_sam2 import Sam2Engine

    return Sam2Engine(checkpoints.sam2, device="cpu")


@pytest.fixture(scope="module")
def sam3(checkpoints):
    from sam.engines.hf_sam3 import Sam3Engine

    return Sam3Engine(checkpoints.sam3, device="cpu")


@pytest.fixture(params=["sam2", "sam3"])
def engine(request, sam2, sam3):
    return {"sam2": sam2, "sam3": sam3}[request.param]


def image_of(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A bright disk on a noisy dark background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:height, :width]
    disk = (cols - width * 0.45) ** 2 + (rows - height * 0.55) ** 2 <= (0.3 * min(height, width)) ** 2
    gray = np.where(disk, 200, 40) + rng.normal(0, 10, (height, width))
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def direct_call(engine, image, box=None, points=None, labels=None, multimask=True):
    """The library itself on the same pixel values: one forward from pixel_values, prompts scaled
    to the S x S frame as Sam2Processor scales them, logits upsampled as post_process_masks does,
    best IoU wins."""
    height, width = image.shape[:2]
    pixels = hf_common.preprocess([image], engine.norm)
    inputs = {}
    if box is not None:
        inputs["input_boxes"] = to_model_frame(torch.tensor([[box]], dtype=torch.float32), engine, height, width)
    if points:
        inputs["input_points"] = to_model_frame(torch.tensor([[points]], dtype=torch.float32), engine, height, width)
        inputs["input_labels"] = torch.tensor([[labels]])
    with torch.inference_mode():
        output = engine.model(pixel_values=pixels, multimask_output=multimask, **inputs)
    best = int(torch.argmax(output.iou_scores[0, 0]))
    upsampled = F.interpolate(
        output.pred_masks[0, :, best : best + 1], (height, width), mode="bilinear", align_corners=False
    )
    return (upsampled[0, 0] > 0).numpy(), float(output.iou_scores[0, 0, best]), output.pred_masks[0, 0, best].numpy()


def to_model_frame(coords: torch.Tensor, engine, height: int, width: int) -> torch.Tensor:
    """Sam2Processor._normalize_coordinates: float32 x * (S / W), y * (S / H), boxes as 2 corners."""
    size = engine.norm.size
    pairs = coords.reshape(*coords.shape[:-1], -1, 2).clone()
    pairs[..., 0] = pairs[..., 0] * (size / width)
    pairs[..., 1] = pairs[..., 1] * (size / height)
    return pairs.reshape(coords.shape)


# -- choosing the engine -----------------------------------------------------------------------


def test_auto_picks_the_engine_from_the_checkpoint(checkpoints, tmp_path):
    from sam.engines.hf_sam2 import Sam2Engine
    from sam.engines.hf_sam3 import Sam3Engine

    family = hf_common.checkpoint_family
    assert family(str(checkpoints.sam2)) == family(str(checkpoints.sam2_video)) == "sam2"
    assert family(str(checkpoints.sam3)) == family(str(checkpoints.sam3_tracker)) == "sam3"
    assert family("facebook/sam2.1-hiera-small") == family("facebook/sam2-hiera-large") == "sam2"
    assert family("facebook/sam3") == "sam3"
    assert family("facebook/sam2.1_hiera_small.pt") is None  # a weights file name, not an id
    assert family(str(tmp_path / "missing.pth")) is None and family("") is None
    sam2 = load_engine(Settings(sam_engine="auto", sam_checkpoint=str(checkpoints.sam2), device="cpu"))
    sam3 = load_engine(Settings(sam_engine="auto", sam_checkpoint=str(checkpoints.sam3), device="cpu"))
    assert isinstance(sam2, Sam2Engine) and sam2.name == "sam2-sam2-tiny"
    assert isinstance(sam3, Sam3Engine) and sam3.name == "sam3-sam3-tiny" and sam3.supports_text
    explicit = load_engine(Settings(sam_engine="sam2", sam_checkpoint=str(checkpoints.sam2_video), device="cpu"))
    assert isinstance(explicit, Sam2Engine)  # a sam2_video config loads into the image model


def test_a_checkpoint_of_another_family_or_with_missing_weights_is_refused(checkpoints, tmp_path):
    from sam.engines.hf_sam2 import Sam2Engine
    from sam.engines.hf_sam3 import Sam3Engine

    with pytest.raises(ValueError, match="not a SAM 2 model"):
        Sam2Engine(checkpoints.sam3, device="cpu")
    with pytest.raises(ValueError, match="not a SAM 3 checkpoint"):
        Sam3Engine(checkpoints.sam2, device="cpu")
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((checkpoints.sam2 / "config.json").read_bytes())
    weights = load_file(str(checkpoints.sam2 / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "mask_decoder" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        Sam2Engine(broken, device="cpu")
    with pytest.raises(ValueError, match="needs SAM_CHECKPOINT"):
        load_engine(Settings(sam_engine="sam3", sam_checkpoint=""))


def test_a_hub_id_fetches_only_configs_safetensors_and_tokenizer(monkeypatch):
    """No pickle is ever fetched; an unreachable or gated repo names the setting to change."""
    import huggingface_hub

    asked = {}

    def refuse(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        hf_common.resolve_checkpoint("facebook/sam3", "sam3")
    assert asked["repo_id"] == "facebook/sam3"
    assert set(asked["allow_patterns"]) == {"*.json", "*.safetensors", "*.txt"}
    with pytest.raises(ValueError, match="neither a directory"):
        hf_common.resolve_checkpoint("/no/such/dir", "sam2")


# -- coordinates -------------------------------------------------------------------------------


class _EchoDecoder:
    """Stands in for the model's forward: low-resolution logits +10 inside the prompt box (or a
    disk around each positive point) in the model frame, -10 elsewhere; records its inputs."""

    def __init__(self, engine):
        self.low = engine.mask_input_size[0]
        self.size = engine.norm.size
        self.calls = []

    def __call__(
        self,
        image_embeddings,
        multimask_output,
        input_boxes=None,
        input_points=None,
        input_labels=None,
        input_masks=None,
    ):
        self.calls.append(dict(boxes=input_boxes, points=input_points))
        scale = self.low / self.size
        centres = (torch.arange(self.low, dtype=torch.float32) + 0.5) / scale  # low-res cell centres, model frame
        ys, xs = centres[:, None], centres[None, :]
        inside = torch.zeros(self.low, self.low, dtype=torch.bool)
        if input_boxes is not None:
            x0, y0, x1, y1 = input_boxes[0, 0].tolist()
            inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        else:
            for (x, y), label in zip(input_points[0, 0].tolist(), input_labels[0, 0].tolist(), strict=True):
                if label == 1:
                    inside |= (xs - x) ** 2 + (ys - y) ** 2 <= (self.size / 8) ** 2
        logits = torch.where(inside, 10.0, -10.0)
        return SimpleNamespace(pred_masks=logits[None, None, None], iou_scores=torch.tensor([[[0.9]]]))


@pytest.mark.parametrize("shape", SHAPES)
def test_a_box_in_original_pixels_comes_back_as_a_mask_in_original_pixels(engine, shape, monkeypatch):
    height, width = shape
    echo = _EchoDecoder(engine)
    monkeypatch.setattr(engine.model, "forward", echo)
    embedding = engine.embed(image_of(height, width))
    box = [0.2 * width, 0.3 * height, 0.7 * width, 0.9 * height]
    mask, score = engine.predict(embedding, box=box)
    assert mask.shape == (height, width) and mask.dtype == bool and score == pytest.approx(0.9)
    size = engine.norm.size
    sent = echo.calls[-1]["boxes"][0, 0].tolist()
    assert sent == pytest.approx(
        [box[0] * size / width, box[1] * size / height, box[2] * size / width, box[3] * size / height]
    )
    assert torch.equal(
        echo.calls[-1]["boxes"], to_model_frame(torch.tensor([[box]], dtype=torch.float32), engine, height, width)
    )
    expected = np.zeros(shape, bool)
    expected[int(round(box[1])) : int(round(box[3])), int(round(box[0])) : int(round(box[2]))] = True
    cell = max(height, width) / (engine.mask_input_size[0])  # one low-res cell, in original pixels
    assert np.logical_and(mask, expected).sum() / np.logical_or(mask, expected).sum() > 1 - 4 * cell / min(
        height, width
    )
    rows, cols = np.nonzero(mask)
    assert abs(cols.min() - box[0]) <= cell * width / max(height, width) + 1
    assert abs(rows.max() + 1 - box[3]) <= cell * height / max(height, width) + 1


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_points_in_original_pixels_reach_the_model_frame_and_come_back(engine, shape, monkeypatch):
    height, width = shape
    echo = _EchoDecoder(engine)
    monkeypatch.setattr(engine.model, "forward", echo)
    points = [[0.3 * width, 0.6 * height], [0.9 * width, 0.1 * height]]
    mask, _ = engine.predict(engine.embed(image_of(height, width)), points=points, point_labels=[1, 0])
    size = engine.norm.size
    sent = echo.calls[-1]["points"][0, 0].flatten().tolist()
    assert sent == pytest.approx([v for x, y in points for v in (x * size / width, y * size / height)])
    assert mask[int(points[0][1]), int(points[0][0])] and not mask[int(points[1][1]), int(points[1][0])]


# -- the real decoder: bit for bit the library's answer ----------------------------------------

PROMPTS = [
    dict(box=[20, 15, 100, 80]),
    dict(points=[[55, 50]], labels=[1]),
    dict(box=[20, 15, 100, 80], points=[[55, 50], [25, 20]], labels=[1, 0]),
    dict(points=[[55, 50], [70, 60], [10, 10]], labels=[1, 1, 0]),
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["box", "point", "box+points", "points"])
@pytest.mark.parametrize("shape", [(90, 130), (130, 90)])
def test_the_mask_equals_a_direct_transformers_call(engine, prompt, shape):
    height, width = shape
    image = image_of(height, width)
    scale = np.array([width / 130, height / 90] * 2)
    box = None if "box" not in prompt else list(np.array(prompt["box"]) * scale)
    points = None if "points" not in prompt else [list(np.array(p) * scale[:2]) for p in prompt["points"]]
    labels = prompt.get("labels")
    got = engine.predict_with_logits(engine.embed(image), box=box, points=points, point_labels=labels)
    ambiguous = (box is None) != (points is None) and (points is None or len(points) == 1)
    mask, score, logits = direct_call(engine, image, box, points, labels, multimask=ambiguous)
    assert np.array_equal(got.mask, mask)
    assert got.score == pytest.approx(score, abs=0) and np.array_equal(got.logits, logits)
    assert got.logits.shape == engine.mask_input_size and got.logits.dtype == np.float32


def test_sam3_embeds_once_for_tracker_and_detector_exactly_as_the_library(sam3):
    """The engine runs the ViT once; its tracker features are get_image_embeddings' bit for bit."""
    pixels = hf_common.preprocess([image_of(90, 130)], sam3.norm)
    with torch.inference_mode():
        reference = sam3.model.get_image_embeddings(pixels)
    embedding = sam3.embed(image_of(90, 130))
    assert len(embedding.features) == len(reference) == 3
    for ours, theirs in zip(embedding.features, reference, strict=True):
        assert torch.equal(ours, theirs)
    assert sam3.detector.vision_encoder.backbone is sam3.model.vision_encoder.backbone  # one copy in memory


def test_embedding_bytes_count_every_tensor_and_batches_match_single_images(engine):
    images = [image_of(90, 130), image_of(50, 70, seed=1)]
    single = [engine.embed(image) for image in images]
    batched = engine.embed_batch(images)
    for one, many in zip(single, batched, strict=True):
        assert one.original_size == many.original_size
        for a, b in zip(one.features, many.features, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
            assert b.untyped_storage().nbytes() == b.nelement() * 4  # its own copy, not a view of the batch
    expected = sum(t.nelement() * 4 for t in single[0].features)
    if engine.name.startswith("sam3"):
        expected += single[0].backbone.nelement() * 4
    assert embedding_nbytes(engine, single[0]) == engine.embedding_nbytes(single[0]) == expected


# -- refinement --------------------------------------------------------------------------------


def test_previous_logits_as_mask_input_reach_the_decoder_and_change_the_answer(engine):
    embedding = engine.embed(image_of(90, 130))
    first = engine.predict_with_logits(embedding, points=[[55, 50]], point_labels=[1])
    again = engine.predict_with_logits(embedding, points=[[55, 50], [80, 30]], point_labels=[1, 1])
    refined = engine.predict_with_logits(
        embedding, points=[[55, 50], [80, 30]], point_labels=[1, 1], mask_input=first.logits
    )
    assert not np.array_equal(refined.logits, again.logits)
    image = image_of(90, 130)
    pixels = hf_common.preprocess([image], engine.norm)
    with torch.inference_mode():
        output = engine.model(
            pixel_values=pixels,
            input_points=to_model_frame(torch.tensor([[[[55.0, 50.0], [80.0, 30.0]]]]), engine, 90, 130),
            input_labels=torch.tensor([[[1, 1]]]),
            input_masks=torch.from_numpy(first.logits)[None, None],
            multimask_output=False,
        )
    assert np.array_equal(refined.logits, output.pred_masks[0, 0, 0].numpy())
    with pytest.raises(ValueError, match="mask_input"):
        engine.predict(embedding, points=[[55, 50]], point_labels=[1], mask_input=np.zeros((3, 4, 5, 6)))
    with pytest.raises(ValueError, match="a prompt needs"):
        engine.predict(embedding)


# -- SAM 3 text prompts -------------------------------------------------------------------------


def test_text_prompt_equals_a_direct_detector_call(sam3, checkpoints):
    """Against a separately loaded Sam3Model fed pixel_values (its own backbone pass)."""
    from transformers import AutoTokenizer, Sam3Model

    image = image_of(90, 130)
    threshold = 0.25
    got = sam3.segment_text(sam3.embed(image), "nucleus", score_threshold=threshold)
    model = Sam3Model.from_pretrained(str(checkpoints.sam3), use_safetensors=True).eval()
    tokens = AutoTokenizer.from_pretrained(str(checkpoints.sam3))(
        ["nucleus"], padding="max_length", max_length=32, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model(pixel_values=hf_common.preprocess([image], sam3.norm), **tokens)
    scores = (output.pred_logits.sigmoid() * output.presence_logits.sigmoid())[0]
    expected = []
    for index in torch.nonzero(scores > threshold).flatten().tolist():
        probability = F.interpolate(
            output.pred_masks[:, index : index + 1].sigmoid(), (90, 130), mode="bilinear", align_corners=False
        )
        mask = (probability[0, 0] > 0.5).numpy()
        if mask.any():
            expected.append((float(scores[index]), mask.tobytes()))
    assert len(expected) > 0
    assert sorted(expected) == sorted((score, mask.tobytes()) for mask, score in got)
    assert [score for _, score in got] == sorted((score for _, score in got), reverse=True)


@pytest.mark.parametrize("shape", [(90, 130), (130, 90)])
def test_text_prompt_gives_one_result_per_instance_above_the_threshold(sam3, shape, monkeypatch):
    """A detector answer with three confident queries (at known places) and nine weak ones."""
    height, width = shape
    low = 64
    logits = torch.full((1, 12), -4.0)
    logits[0, [2, 5, 9]] = torch.tensor([3.0, 2.0, 1.0])
    masks = torch.full((1, 12, low, low), -10.0)
    squares = {2: (4, 4), 5: (30, 20), 9: (44, 44)}  # query -> top-left (row, col), 12x12 low-res cells
    for query, (row, col) in squares.items():
        masks[0, query, row : row + 12, col : col + 12] = 10.0
    answer = SimpleNamespace(pred_logits=logits, presence_logits=torch.tensor([[5.0]]), pred_masks=masks)
    monkeypatch.setattr(sam3, "_detect", lambda embedding, phrase: answer)
    found = sam3.segment_text(sam3.embed(image_of(height, width)), "  cell \n", score_threshold=0.5)
    assert len(found) == 3
    assert [round(r.score, 3) for r in found] == [
        round(torch.sigmoid(torch.tensor(v)).item() * torch.sigmoid(torch.tensor(5.0)).item(), 3)
        for v in (3.0, 2.0, 1.0)
    ]
    for result, (row, col) in zip(found, squares.values(), strict=True):
        rows, cols = np.nonzero(result.mask)
        assert rows.min() == pytest.approx(row * height / low, abs=height / low + 1)
        assert cols.min() == pytest.approx(col * width / low, abs=width / low + 1)
        assert rows.max() + 1 == pytest.approx((row + 12) * height / low, abs=height / low + 1)
    assert (
        len(sam3.segment_text(sam3.embed(image_of(height, width)), "cell", score_threshold=0.5, max_instances=2)) == 2
    )


def test_text_prompts_are_checked_and_need_the_detector(sam3, checkpoints):
    from sam.engines.hf_sam3 import Sam3Engine

    embedding = sam3.embed(image_of(40, 50))
    for bad in ("", "   ", None, "x" * 201):
        with pytest.raises(BadRequest):
            sam3.segment_text(embedding, bad)
    tracker_only = Sam3Engine(checkpoints.sam3_tracker, device="cpu")
    assert not tracker_only.supports_text
    mask, _ = tracker_only.predict(tracker_only.embed(image_of(40, 50)), box=[5, 5, 30, 30])
    assert mask.shape == (40, 50)
    with pytest.raises(BadRequest, match="no text prompts"):
        tracker_only.segment_text(image_of(40, 50), "cell")


# -- threads, bf16 -----------------------------------------------------------------------------


def test_embed_predict_and_text_run_concurrently_with_the_answers_of_a_single_thread(engine):
    assert engine.independent_embed is True
    images = [image_of(90, 130, seed=s) for s in range(3)]
    box = [20, 15, 100, 80]
    reference_embeddings = [engine.embed(image) for image in images]
    reference = [engine.predict(e, box=box)[0] for e in reference_embeddings]
    has_text = getattr(engine, "supports_text", False)
    text_reference = (
        [engine.segment_text(e, "cell", score_threshold=0.0) for e in reference_embeddings] if has_text else []
    )

    def embed_then_predict(index):
        return engine.predict(engine.embed(images[index]), box=box)[0]

    def click(index):
        return engine.predict(reference_embeddings[index], box=box)[0]

    def text(index):
        return engine.segment_text(reference_embeddings[index], "cell", score_threshold=0.0)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        embeds = [pool.submit(embed_then_predict, i % 3) for i in range(6)]
        clicks = [pool.submit(click, i % 3) for i in range(12)]
        texts = [pool.submit(text, i % 3) for i in range(3)] if has_text else []
        for i, future in enumerate(embeds):
            assert np.array_equal(future.result(timeout=60), reference[i % 3])
        for i, future in enumerate(clicks):
            assert np.array_equal(future.result(timeout=60), reference[i % 3])
        for i, future in enumerate(texts):
            got = future.result(timeout=60)
            assert [(m.tobytes(), s) for m, s in got] == [(m.tobytes(), s) for m, s in text_reference[i]]


def test_bf16_encoder_on_cpu_gives_float32_embeddings_and_close_masks(checkpoints, sam2):
    from sam.engines.hf_sam2 import Sam2Engine

    bf16 = Sam2Engine(checkpoints.sam2, device="cpu", bf16=True)
    embedding = bf16.embed(image_of(90, 130))
    assert all(level.dtype == torch.float32 for level in embedding.features)
    fp32 = sam2.embed(image_of(90, 130))
    cosine = F.cosine_similarity(embedding.features[-1].flatten(), fp32.features[-1].flatten(), dim=0)
    assert cosine > 0.99
    assert not sam2.bf16  # fp32 by default on a CPU
