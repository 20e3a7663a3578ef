"""Error envelopes and the one middleware that turns exceptions into them: OpenAI's, or the
envelope the matched route's API declares (`Route.error_body`, proxy/serving/routes.py:
Anthropic's on /v1/messages).

Clients only ever see messages written for them: exception text, file paths and backend
addresses stay in the log. The errors themselves, `APIError` and one entry per `error.code`,
are proxy/error_catalogue.py's; `APIError` and `error_envelope` are importable from here too.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web

from .error_catalogue import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    REQUEST_TOO_LARGE,
    SERVER_ERROR,
    APIError,
    error_envelope,
)
from .serving.routes import ErrorBody, openai_error_body, route_of

__all__ = [
    "ERROR_KEY",
    "REQUEST_ID_KEY",
    "SURROGATE",
    "APIError",
    "error_envelope",
    "error_middleware",
    "error_response",
    "json_dumps",
]

log = logging.getLogger("proxy")

REQUEST_ID_KEY = web.RequestKey("request_id", str)
# The error the middleware answered with: the metrics count its code whatever the envelope.
ERROR_KEY = web.RequestKey("error", APIError)

# Echoing a client's own path back is useful (OpenAI does it); capping it keeps the body small.
_MAX_ECHOED_PATH = 200
# A surrogate code point in a Python str: always unpaired (pairs decode to one character),
# and without any UTF-8 form.
SURROGATE = re.compile("[\ud800-\udfff]")


def error_response(
    error: APIError,
    headers: dict[str, str] | None = None,
    *,
    body: ErrorBody = openai_error_body,
    request_id: str = "-",
) -> web.Response:
    return web.json_response(
        body(error, request_id), status=error.status, headers=headers, dumps=json_dumps
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
        return NOT_FOUND(route=route)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return METHOD_NOT_ALLOWED(route=route)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return REQUEST_TOO_LARGE(limit=request.client_max_size)
    error_type = INVALID_REQUEST if exc.status < 500 else SERVER_ERROR
    return APIError(exc.status, exc.reason, type=error_type)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return _answer(request, exc, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and other non-errors pass through untouched
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _answer(request, _from_http_exception(request, exc), headers)
    except Exception:
        request_id = request.get(REQUEST_ID_KEY, "-")
        log.exception("request %s failed with an unexpected error", request_id)
        return _answer(request, INTERNAL_ERROR(request_id=request_id))


def _answer(
    request: web.Request, error: APIError, headers: dict[str, str] | None = None
) -> web.Response:
    """`error` in the envelope of the route's API (OpenAI's where no route matched)."""
    request[ERROR_KEY] = error
    route = route_of(request)
    body = route.error_body if route is not None else openai_error_body
    return error_response(error, headers, body=body, request_id=request.get(REQUEST_ID_KEY, "-"))
