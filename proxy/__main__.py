"""`python -m proxy [flags]`: serve the OpenAI-compatible API until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web

from .app import ROUTES, create_app
from .config import parse_config
from .observability.logs import configure_logging
from .serving.hardening import describe_limits
from .serving.routes import describe_routes
from .serving.shutdown import CANCEL_GRACE_S, install_signal_drain

log = logging.getLogger("proxy")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    server = config.server
    configure_logging(server.log_level, server.log_format)
    log.info(
        "serving %r on %s:%d, Triton model %r at %s",
        server.served_model_name,
        server.host,
        server.port,
        server.triton_model,
        server.triton_url,
    )
    log.info(
        "served names: %s; image URL fetching %s; %s",
        ", ".join(f"{name} -> {model}" for name, model in config.served_models.items()),
        "on" if config.fetch.enabled else "off (data: URLs only)",
        "lazy loading (the first request loads a model)" if server.lazy_load else "eager loading",
    )
    log.info("%s", describe_limits(config))
    log.info(
        "%s",
        describe_routes(
            ROUTES, api_key=bool(server.api_key), metrics_require_auth=server.metrics_require_auth
        ),
    )
    app = create_app(config)
    # SIGINT/SIGTERM drain first (proxy/serving/shutdown.py): not ready, new requests refused, the
    # admitted ones finish within --shutdown-timeout-s. Then run_app stops accepting,
    # cancels what is left, and runs the app's cleanup, which closes the Triton gRPC channel.
    install_signal_drain(app, server.shutdown_timeout_s)
    web.run_app(
        app,
        host=server.host,
        port=server.port,
        handle_signals=False,
        shutdown_timeout=CANCEL_GRACE_S,
        # A client that disconnects cancels its handler, so Triton stops generating for it
        # even when no byte is being written (non-stream requests, long prefill).
        handler_cancellation=True,
        # The proxy logs its own line per request (id, status, tokens, duration).
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
