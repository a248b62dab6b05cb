"""Pure mask geometry: NumPy in, NumPy out, no I/O.

- `rle`: Label Studio's brush RLE, byte-identical to label-studio-sdk's and ~30x faster.
- `polygons`: masks <-> polygons with holes; rasterisation in bands of rows.
- `coords`: Label Studio's percent coordinates <-> pixels of the original image.
"""
