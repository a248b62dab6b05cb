"""Command-line entry point shared by both backends: `python -m sam` / `python -m segmentation`.

Reads the configuration once (`Settings.from_env()`), configures logging, and serves the model
with uvicorn in one process (FastAPI runs the synchronous endpoints in its thread pool).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from backends.server.model_base import LabelStudioMLBase
from backends.settings import Settings, SettingsError


def build_parser(model_class: type[LabelStudioMLBase], default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Serve {model_class.__name__} as a Label Studio ML backend. "
        "Configuration comes from environment variables (see README, Configuration)."
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port to listen on (default: {default_port})")
    return parser


def main(
    model_class: type[LabelStudioMLBase],
    argv: Sequence[str] | None = None,
    default_port: int = 9090,
) -> None:
    """Parse `--host`/`--port`, build the app and serve it until interrupted."""
    import uvicorn

    from backends.logs import configure_logging
    from backends.server.app import create_app

    args = build_parser(model_class, default_port).parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:  # say what to fix and refuse to start, without a traceback
        print(f"{model_class.__name__}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    app = create_app(model_class, settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        log_config=None,  # keep the handlers configure_logging installed
        access_log=False,  # the server logs one line per request itself
        timeout_graceful_shutdown=5,
    )
