"""`python -m proxy [flags]`: serve the OpenAI-compatible API until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .app import served_routes
from .config import parse_config
from .observability.logs import configure_logging
from .serving.hardening import describe_limits
from .serving.routes import describe_routes
from .serving.workers import run_workers, serve

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
            served_routes(config),
            api_key=bool(server.api_key),
            metrics_require_auth=server.metrics_require_auth,
        ),
    )
    if server.workers == 1:
        serve(config)
        return
    log.info(
        "%d worker processes on port %d (SO_REUSEPORT), %d generating requests in flight "
        "among them",
        server.workers,
        server.port,
        config.admission.max_concurrent_requests,
    )
    sys.exit(run_workers(config))


if __name__ == "__main__":
    main()
