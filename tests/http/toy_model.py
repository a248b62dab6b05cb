"""A small model for the server's HTTP tests: real behaviour, no weights.

It answers each task with one brush region whose RLE encodes the task id, so tests can check order;
records what the server handed it (in its `ToyService`, one per app: `app.state.server.service`);
and can be told to fail or to block in `fit`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from backends.errors import ImageUnavailable
from backends.server.model_base import BackendRuntime, BackendService, LabelStudioMLBase, ModelResponse

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


class FakeLabelStudio:
    """Stands in for backends.label_studio.client.LabelStudioClient: records configure(), answers the probe."""

    def __init__(self, url: str = "", reachable: bool = True, probe_seconds: float = 0.0):
        self.url = url
        self.reachable = reachable
        self.probe_seconds = probe_seconds
        self.configured: list[dict] = []
        self.probes = 0

    def configure(self, hostname: str | None = None, access_token: str | None = None) -> None:
        self.configured.append({"hostname": hostname, "access_token": access_token})
        if hostname:
            self.url = hostname

    def health(self) -> bool:
        self.probes += 1
        if self.probe_seconds:
            threading.Event().wait(self.probe_seconds)
        return self.reachable

    def setup_report(self) -> dict:
        return {"url_from": "fake", "refused_hostnames": 0, "refused_tokens": 0}


class ToyService(BackendService):
    """What the toy model's `startup` returns: the runtime it was given and a record of the calls,
    per app, so tests never share it."""

    def __init__(self, runtime: BackendRuntime):
        super().__init__()
        self.runtime = runtime
        self.instances_created = 0
        self.predict_calls: list[dict] = []
        self.fits: list[tuple[str, dict]] = []
        self.fit_done = threading.Event()
        self.fit_gate = threading.Event()  # fit waits on it: tests clear it to prove webhooks don't wait
        self.fit_gate.set()
        self.predict_gate: threading.Event | None = None
        self.predicted = runtime.metrics.counter("toy_predictions", "Tasks the toy model answered")

    def health(self) -> dict:
        return {"engine": "toy", "model_version": ToyModel.MODEL_VERSION}

    def versions(self) -> list:
        return ["toy-1", "toy-0"]


class ToyModel(LabelStudioMLBase):
    MODEL_VERSION = "toy-1"
    service: ToyService

    @classmethod
    def startup(cls, runtime: BackendRuntime) -> ToyService:
        return ToyService(runtime)

    def setup(self) -> None:
        self.service.instances_created += 1

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        toy = self.service
        toy.predict_calls.append({"tasks": tasks, "context": context, "kwargs": kwargs})
        if toy.predict_gate is not None:
            toy.predict_gate.wait(10)
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
                label = region["value"].get("rectanglelabels", region["value"].get("keypointlabels", [label]))[0]
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
            toy.predicted.inc()
        return ModelResponse(predictions=predictions)

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict:
        toy = self.service
        toy.fit_gate.wait(10)
        toy.fits.append((event, data))
        toy.fit_done.set()
        if event == "ANNOTATION_DELETED":
            raise RuntimeError("the toy model cannot unlearn")
        return {"trained_on": event}
