"""A small model for the server's HTTP tests: real behaviour, no weights.

It answers each task with one brush region whose RLE encodes the task id, so tests can check order;
records what the server handed it; and can be told to fail or to block in `fit`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from backends.errors import ImageUnavailable
from backends.server.model_base import BackendContext, LabelStudioMLBase, ModelResponse

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nucleus" background="#ff0000"/>
  </BrushLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Nucleus" background="#ff0000"/>
  </RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Nucleus" background="#ff0000"/>
  </KeyPointLabels>
</View>"""

# A config with no output tag: /setup must refuse it.
TEXT_ONLY_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="quality" toName="image"><Choice value="good"/></Choices>
</View>"""


class FakeImageFetcher:
    """Stands in for backends.images.fetcher.ImageFetcher: records configure(), answers the probe."""

    def __init__(self, label_studio_url: str = "", reachable: bool = True, probe_seconds: float = 0.0):
        self.label_studio_url = label_studio_url
        self.reachable = reachable
        self.probe_seconds = probe_seconds
        self.configured: list[dict] = []
        self.probes = 0

    def configure(self, hostname: str | None = None, access_token: str | None = None) -> None:
        self.configured.append({"hostname": hostname, "access_token": access_token})
        if hostname:
            self.label_studio_url = hostname

    def check_label_studio(self) -> bool:
        self.probes += 1
        if self.probe_seconds:
            threading.Event().wait(self.probe_seconds)
        return self.reachable


def make_toy_model() -> type[LabelStudioMLBase]:
    """A fresh subclass per test, so recorded calls never leak between tests."""

    class ToyModel(LabelStudioMLBase):
        MODEL_VERSION = "toy-1"
        startups: list[BackendContext] = []
        instances_created = 0
        predict_calls: list[dict] = []
        fits: list[tuple[str, dict]] = []
        fit_done = threading.Event()
        fit_gate = threading.Event()  # fit waits on it: tests hold it to prove webhooks don't wait
        predict_gate: threading.Event | None = None

        @classmethod
        def startup(cls, context: BackendContext) -> None:
            cls.startups.append(context)
            cls.fit_gate.set()
            cls.predicted = context.metrics.counter("toy_predictions", "Tasks the toy model answered")

        def setup(self) -> None:
            type(self).instances_created += 1

        def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
            type(self).predict_calls.append({"tasks": tasks, "context": context, "kwargs": kwargs})
            if type(self).predict_gate is not None:
                type(self).predict_gate.wait(10)
            predictions = []
            for task in tasks:
                image = task["data"].get("image", "")
                if image.endswith("explode.png"):
                    raise RuntimeError("the toy model exploded")
                if image.endswith("missing.png"):
                    raise ImageUnavailable(f"image of task {task['id']} not found: {image}")
                label = "Nucleus"
                if context and context.get("result"):
                    region = context["result"][0]
                    label = region["value"].get(
                        "rectanglelabels", region["value"].get("keypointlabels", [label])
                    )[0]
                predictions.append(
                    {
                        "result": [
                            {
                                "from_name": "tag",
                                "to_name": "image",
                                "type": "brushlabels",
                                "original_width": 4,
                                "original_height": 3,
                                "value": {
                                    "format": "rle",
                                    "rle": np.array([task["id"], 0, 7], dtype=np.int64),  # numpy on purpose
                                    "brushlabels": [label],
                                },
                            }
                        ],
                        "score": np.float32(0.5),
                    }
                )
                type(self).predicted.inc()
            return ModelResponse(predictions=predictions)

        def fit(self, event: str, data: dict, **kwargs: Any) -> dict:
            type(self).fit_gate.wait(10)
            type(self).fits.append((event, data))
            type(self).fit_done.set()
            if event == "ANNOTATION_DELETED":
                raise RuntimeError("the toy model cannot unlearn")
            return {"trained_on": event}

        @classmethod
        def health(cls) -> dict:
            return {"engine": "toy", "model_version": cls.MODEL_VERSION}

        @classmethod
        def versions(cls) -> list:
            return ["toy-1", "toy-0"]

    return ToyModel
