"""One batch line, run in-process through the endpoint's own route handler: the same parsing,
limits, media checks, Triton stream, timeouts, rendering and metrics as an interactive request
to that endpoint (no HTTP loop-back), at the `batch` priority.

The handler gets a `LineRequest`: the shared path's detached request (proxy/request/detached.py)
with the line's body to read and the batch owner's tenant, so a stored response, say, belongs
to whoever created the batch. Its answer, or the error envelope the error middleware would
have rendered, is what the output or error file holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...error_catalogue import INTERNAL_ERROR, APIError
from ...keys import USAGE_KEY
from ...request.detached import BATCH_ROUTE, DetachedRequest
from ...serving.admission import (
    ADMISSION_KEY,
    DEADLINE_BACKSTOP_S,
    DEADLINE_KEY,
    deadline_exceeded,
)
from ...state.tenancy import TENANT_KEY
from ...transport.contract import Priority
from ..chat.routes import chat_completions
from ..responses.routes import create_response

log = logging.getLogger("proxy.batches")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The handler of each endpoint a batch may run (proxy/state/batches.py ENDPOINTS).
HANDLERS: dict[str, Handler] = {
    "/v1/chat/completions": chat_completions,
    "/v1/responses": create_response,
}


@dataclass(frozen=True)
class LineResponse:
    """What the endpoint answered: its status and JSON body (an error envelope for errors)."""

    status: int
    body: dict[str, Any]
    request_id: str
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def error_code(self) -> str | None:
        error = self.body.get("error") if self.status >= 400 else None
        return error.get("code") if isinstance(error, dict) else None


class LineRequest(DetachedRequest):
    """A detached request with a body to read and the tenant it acts for."""

    def __init__(
        self, app: web.Application, *, endpoint: str, body: bytes, tenant: str, request_id: str
    ) -> None:
        super().__init__(app, request_id=request_id, route=f"{BATCH_ROUTE} {endpoint}")
        self[TENANT_KEY] = tenant
        self._body = body
        self.method = "POST"
        self.path = endpoint

    async def read(self) -> bytes:
        return self._body


def batch_body(request_json: str) -> bytes:
    """The line's body as its endpoint gets it: at the `batch` priority whatever it says.
    ASCII JSON: an unpaired surrogate stays the escape the endpoint's check refuses by name
    (`invalid_unicode`), as in an interactive body."""
    body = json.loads(request_json)
    body["priority"] = Priority.BATCH.value
    return json.dumps(body).encode("ascii")


async def execute_line(
    app: web.Application, endpoint: str, request_json: str, tenant: str
) -> LineResponse:
    """Runs one line's request through `endpoint`'s handler; never raises but for
    cancellation (an error is the envelope a client would have got)."""
    request_id = uuid.uuid4().hex
    request = LineRequest(
        app, endpoint=endpoint, body=batch_body(request_json), tenant=tenant, request_id=request_id
    )
    status, body = 500, INTERNAL_ERROR(request_id=request_id).envelope()
    try:
        # The deadline as admission gives an interactive request: the stream reports it
        # (504); the backstop cancels a handler stuck elsewhere.
        async with asyncio.timeout_at(request[DEADLINE_KEY] + DEADLINE_BACKSTOP_S):
            response = await HANDLERS[endpoint](request.as_request)
        status, body = response.status, _json_body(response)
    except APIError as exc:
        status, body = exc.status, exc.envelope()
    except TimeoutError:
        error = deadline_exceeded(app[ADMISSION_KEY].settings.request_timeout_s)
        status, body = error.status, error.envelope()
    except asyncio.CancelledError:
        request.record.cancelled = True  # counted and logged as a client gone (499)
        request.finish(500)
        raise
    except Exception:
        log.exception("batch line request %s failed with an unexpected error", request_id)
    usage = request.get(USAGE_KEY)
    response = LineResponse(
        status,
        body,
        request_id,
        input_tokens=usage.prompt_tokens if usage else 0,
        output_tokens=usage.completion_tokens if usage else 0,
    )
    request.finish(status, response.error_code)
    return response


def _json_body(response: web.StreamResponse) -> dict[str, Any]:
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        raise TypeError(f"the handler answered a batch line with {type(response).__name__}")
    return json.loads(body)
