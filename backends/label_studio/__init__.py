"""Talking Label Studio's language.

- `auth`: legacy tokens and personal access tokens (JWT refresh), refreshed when they expire.
- `label_config`: the labeling config XML parsed once into `LabelConfig` (which image, which output
  tags, which labels), with size and depth limits.
- `regions`: masks <-> Label Studio results (brush RLE regions, polygon regions, class masks).
"""
