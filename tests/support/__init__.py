"""What the test suites share, one of each; the suites build none of their own.

- `http_host`: `HttpHost`, the one loopback HTTP server (routes by path, or an app; records every
  request; replies that drip, leave out Content-Length or change in `sequence`; stops and comes
  back on the same port); `SilentSocket`, `closed_port_url()`.
- `label_studio`: `FakeLabelStudio` on an HttpHost (legacy token and personal access tokens,
  uploads and local files, storage resolve, project and export), `make_jwt`.
- `payloads`: Label Studio 1.23 bodies: `task`, `annotation`, `project`, regions (`rectangle`,
  `rectangle_around`, `keypoint`, `brush`), `predict_body`, `setup_body`, `webhook_body`, label
  configs (`LABEL_CONFIG` with smart tools, `POLYGON_CONFIG`, `BRUSH_CONFIG`, `SMART_ONLY_CONFIG`).
- `engines`: SAM engines with known answers (`BoxEngine`, `RedEngine`, `DeterministicEngine`) and
  their SAM_ENGINE names.
- `images`: images in memory (`png`, `quadrant_rgb`, `cells`, hostile files: bombs, truncations,
  EXIF orientation).
- `fetcher`: `FakeImageFetcher`, the in-process stand-in for the image fetcher (images by URI).
- `masks`: `iou` of two (H, W) bool masks.

bench/ does not import from here (it is packaged without tests/); tests may use bench's load
generator (`bench.load.run_annotators` and its clicks).
"""
