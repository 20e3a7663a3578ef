"""OpenAI error envelopes and the one middleware that turns exceptions into them.

Clients only ever see messages written for them: exception text, file paths and backend
addresses stay in the log.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger("proxy")

REQUEST_ID_KEY = web.RequestKey("request_id", str)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"
# Seconds a 429 or 503 tells clients to wait (Retry-After): capacity frees up as fast as
# completions end, and a restarted backend is reconnected within seconds.
RETRY_AFTER_S = 1

# Echoing a client's own path back is useful (OpenAI does it); capping it keeps the body small.
_MAX_ECHOED_PATH = 200
# A surrogate code point in a Python str: always unpaired (pairs decode to one character),
# and without any UTF-8 form.
SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error with a message meant for the client, rendered as an OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        # Sent with the envelope: Retry-After on 429/503, WWW-Authenticate on 401.
        self.headers = dict(headers) if headers else None

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, type=self.type, param=self.param, code=self.code)


def error_envelope(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"internal server error (request id {request_id})",
        type=SERVER_ERROR,
        code="internal_error",
    )


def error_response(error: APIError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        error.envelope(), status=error.status, headers=headers, dumps=json_dumps
    )


def json_dumps(obj: Any) -> str:
    # UTF-8 text as is: the original server's users write Chinese.
    text = json.dumps(obj, ensure_ascii=False)
    # An unpaired surrogate a client sent (echoed in an error) has no UTF-8 form; escaped
    # as \udXXX it is still valid JSON.
    return json.dumps(obj) if SURROGATE.search(text) else text


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> APIError:
    """Maps aiohttp's routing/body-size exceptions; any other HTTP status keeps its reason."""
    route = f"{request.method} {request.path[:_MAX_ECHOED_PATH]}"
    if isinstance(exc, web.HTTPNotFound):
        return APIError(404, f"Invalid URL ({route})", code="not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return APIError(405, f"Method not allowed ({route})", code="method_not_allowed")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return APIError(
            413,
            f"Request body too large: the limit is {request.client_max_size} bytes",
            code="request_too_large",
        )
    error_type = INVALID_REQUEST if exc.status < 500 else SERVER_ERROR
    return APIError(exc.status, exc.reason, type=error_type)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return error_response(exc, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and other non-errors pass through untouched
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(_from_http_exception(request, exc), headers)
    except Exception:
        request_id = request.get(REQUEST_ID_KEY, "-")
        log.exception("request %s failed with an unexpected error", request_id)
        return error_response(internal_error(request_id))
