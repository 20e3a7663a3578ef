"""Generation no HTTP request waits on: a background response, a batch line.

The shared request path (proxy/request/generation.py `start_generation`) reads a handful of
request-scoped things from the `web.Request` it runs for: the app, the request id, the
observation record its metrics and log line come from, the deadline, and it leaves the usage
there. A `DetachedRequest` carries exactly those, so that path runs unchanged for work that
outlives (or never had) a request, with the same limits, media checks, timeouts (the deadline
is `--request-timeout-s` from its start) and metrics; `finish` then counts it and logs its
line as the request-log middleware does for a request, under its own `route` label
(`BACKGROUND_ROUTE`, `BATCH_ROUTE`), so it is never counted as the HTTP request that started
it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from ..errors import REQUEST_ID_KEY
from ..observability.metrics import METRICS_KEY
from ..observability.observe import RECORD_KEY, RequestRecord, finish
from ..serving.admission import ADMISSION_KEY, DEADLINE_KEY

BACKGROUND_ROUTE = "background /v1/responses"
BATCH_ROUTE = "batch"


class DetachedRequest(dict[Any, Any]):
    """What `start_generation` needs of a request, for work without one; pass it where a
    `web.Request` is expected (`as_request`)."""

    def __init__(
        self, app: web.Application, *, request_id: str, route: str, method: str = "POST"
    ) -> None:
        super().__init__()
        self.app = app
        self[REQUEST_ID_KEY] = request_id
        self[RECORD_KEY] = RequestRecord(
            request_id=request_id,
            method=method,
            path=route,
            route=route,
            started=time.monotonic(),
        )
        settings = app[ADMISSION_KEY].settings
        self[DEADLINE_KEY] = asyncio.get_running_loop().time() + settings.request_timeout_s

    @property
    def as_request(self) -> web.Request:
        # Duck-typed: the shared path only uses `.app` and the keys set above.
        return self  # type: ignore[return-value]

    @property
    def record(self) -> RequestRecord:
        return self[RECORD_KEY]

    def finish(self, status: int, code: str | None = None) -> None:
        """Counts the work in the metrics and logs its line, as for a request that ended
        with `status` (and the error envelope's `code`)."""
        finish(self[RECORD_KEY], self.app[METRICS_KEY], status, code)
