"""Getting a task's image as pixels, safely.

- `fetcher`: `ImageFetcher`, from Label Studio uploads, local files, cloud storages (through Label
  Studio's resolve endpoint or GCS directly) and allow-listed http(s) hosts; downloads go through
  the Label Studio client (backends/label_studio/client.py).
- `sources`: which URLs may be fetched (parsed once; the SSRF guard) and how an image is named.
- `fetch_guard`: one total deadline per fetch, enforced on the socket, and fetch slots per host.
- `retries`: transient failures tried again within that deadline.
- `decode`: bytes -> HxWx3 uint8 RGB with EXIF orientation, bounded before decoding.
- `pixel_budget`: decoded pixels the whole process may hold at once.
- `disk_cache`: the byte-capped disk cache of fetched image bytes.
"""
