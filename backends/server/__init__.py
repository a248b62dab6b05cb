"""The ML-backend HTTP server both backends run on.

- `app`: `create_app(model_class, settings)`, the FastAPI app: thin routes (/health /setup /predict
  /webhook /versions /metrics) over `BackendServer`, which holds the runtime, the model's service
  and the per-project model instances.
- `guard`: the ASGI guard in front of it (basic auth, body limits, error answers, telemetry).
- `protocol`: request and answer shapes of Label Studio's ML-backend protocol.
- `model_base`: `LabelStudioMLBase`, the contract a backend model implements; `BackendRuntime` (the
  machinery every model gets as `self.runtime`) and `BackendService` (what `startup` returns and
  every instance gets as `self.service`).
- `work_queue`: the bounded background executor (webhook jobs, prewarms).
- `cli`: `python -m sam` / `python -m segmentation` start a backend with uvicorn.
"""
