"""The core shared by the SAM (9090) and segmentation (7070) backends.

- `server/`: the ML-backend HTTP server (app, guard, protocol, model contract, background queue, CLI).
- `label_studio/`: Label Studio's auth, label config and result formats.
- `images/`: fetching and decoding a task's image within bounds.
- `masks/`: pure mask geometry (brush RLE, polygons, coordinates).
- `settings`, `errors`, `logs`, `metrics`: configuration read once, the error hierarchy that carries
  the HTTP status, redacted logging, Prometheus metrics.
- `devices`: DEVICE -> the torch device (one rule for both backends).
"""
