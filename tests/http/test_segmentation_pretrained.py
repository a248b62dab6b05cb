"""Zero-shot pre-annotation through the HTTP backend: a pretrained (tiny, saved, nothing
downloaded) SegFormer answers before any training, its classes mapped to the project's labels by
SEG_LABEL_MAP, and /health says which labels it predicts and from which model."""

from __future__ import annotations

from fastapi.testclient import TestClient

from backends.masks.rle import decode_rle
from backends.server.app import create_app
from segmentation.model import SegmentationBackend
from tests.http.test_segmentation_backend import SIZE, backend_settings, label_studio, predict  # noqa: F401 (fixture)
from tests.support.tiny_hf_models import save_tiny_segformer


def test_a_pretrained_model_pre_annotates_with_mapped_labels_before_any_training(label_studio, tmp_path, one_thread):  # noqa: F811
    model = save_tiny_segformer(tmp_path / "segformer-clothes", favour=1)  # "Upper-clothes" wins
    settings = backend_settings(
        label_studio,
        tmp_path,
        seg_model=f"hf:{model}",
        seg_label_map="upper-clothes=nucleus,Pants=Trousers",  # the config's label is "Nucleus"
    )
    with TestClient(create_app(SegmentationBackend, settings)) as client:
        health = client.get("/health").json()
        assert health["model_state"] == "ready"
        assert health["fallback_model"] == "pretrained-segformer-clothes"
        assert health["fallback_labels"] == ["nucleus", "Trousers"]
        assert health["fallback_source"] == str(model)

        results = predict(client, [9, 10])

    assert [r["model_version"] for r in results] == ["pretrained-segformer-clothes"] * 2
    for result in results:
        brushes = [region for region in result["result"] if region["type"] == "brushlabels"]
        assert [region["value"]["brushlabels"] for region in brushes] == [["Nucleus"]]
        mask = decode_rle(brushes[0]["value"]["rle"], *SIZE)
        assert mask.shape == SIZE and mask.mean() > 0.9  # the favoured class covers the image
        assert 0.9 < brushes[0]["score"] <= 1.0  # the mean confidence of its pixels


def test_a_label_map_that_matches_no_model_class_is_reported_in_health(label_studio, tmp_path, one_thread):  # noqa: F811
    model = save_tiny_segformer(tmp_path / "segformer-clothes")
    settings = backend_settings(
        label_studio,
        tmp_path,
        seg_checkpoint=f"hf:{model}",
        seg_label_map="Shoe=Nucleus",
    )
    with TestClient(create_app(SegmentationBackend, settings)) as client:
        health = client.get("/health").json()
        assert health["model_state"] == "no model" and health["fallback_model"] is None
        assert "SEG_LABEL_MAP" in health["fallback_model_error"]
        assert predict(client, [9]) == []
