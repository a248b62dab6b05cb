"""Draw docs/classic_example.png: smart rectangles on scikit-image's `coins` sample and the masks
the weight-free classic engine returns for them (the picture in README.md).

    .venv/bin/python docs/make_example.py
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from skimage import data

from sam.engines.classic import ClassicEngine

# Smart rectangles (XYXY pixels) drawn loosely around four coins, as an annotator would.
BOXES = [(16, 22, 72, 78), (127, 96, 183, 150), (241, 160, 304, 222), (300, 10, 370, 78)]
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48)]


def main() -> Path:
    image = np.repeat(data.coins()[..., None], 3, axis=2)  # HxWx3 uint8
    engine = ClassicEngine()
    embedding = engine.embed(image)
    canvas = image.copy()
    for box, colour in zip(BOXES, COLOURS, strict=True):
        mask, _score = engine.predict(embedding, box=list(box))
        canvas[mask] = (0.45 * canvas[mask] + 0.55 * np.array(colour)).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, 1)
        cv2.rectangle(canvas, box[:2], box[2:], (255, 255, 255), 1)
    out = Path(__file__).with_name("classic_example.png")
    cv2.imwrite(str(out), cv2.cvtColor(np.concatenate([image, canvas], axis=1), cv2.COLOR_RGB2BGR))
    return out


if __name__ == "__main__":
    print(main())
