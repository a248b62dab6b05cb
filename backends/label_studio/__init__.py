"""Talking Label Studio's language.

- `client`: `LabelStudioClient`, the one client of Label Studio (where it is, the /setup trust rule,
  auth, `get_json`, `download`, `health`), used by the image fetcher, training, /health and /setup.
- `auth`: legacy tokens and personal access tokens (JWT refresh), refreshed when they expire.
- `label_config`: the labeling config XML parsed once into `LabelConfig` (which image, which output
  tags, which labels), with size and depth limits.
- `regions`: masks <-> Label Studio results (brush RLE regions, polygon regions, class masks).
- `annotations`: which of a task's annotations is its ground truth (the newest usable one).
"""
