"""The ML-backend HTTP server both backends run on.

- `app`: `create_app(model_class, settings)`, the FastAPI app and its routes (/health /setup /predict
  /webhook /versions /metrics).
- `guard`: the ASGI guard in front of it (basic auth, body limits, error answers, telemetry).
- `protocol`: request and answer shapes of Label Studio's ML-backend protocol.
- `model_base`: `LabelStudioMLBase`, the contract a backend model implements.
- `work_queue`: the bounded background executor (webhook jobs, prewarms).
- `cli`: `python -m sam` / `python -m segmentation` start a backend with uvicorn.
"""
