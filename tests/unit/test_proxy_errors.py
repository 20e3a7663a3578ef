"""The OpenAI error envelope and the middleware that maps exceptions to it."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.errors import REQUEST_ID_KEY, APIError, error_envelope, error_middleware


def test_envelope_has_exactly_the_openai_fields():
    error = APIError(400, "bad value", param="messages[0].content", code="invalid_value")
    assert error.envelope() == {
        "error": {
            "message": "bad value",
            "type": "invalid_request_error",
            "param": "messages[0].content",
            "code": "invalid_value",
        }
    }


def test_envelope_defaults_are_null():
    assert error_envelope("m", type="server_error") == {
        "error": {"message": "m", "type": "server_error", "param": None, "code": None}
    }


async def run_middleware(handler, method="POST", path="/v1/chat/completions", max_size=1024):
    app = web.Application(client_max_size=max_size)
    request = make_mocked_request(method, path, app=app, client_max_size=max_size)
    request[REQUEST_ID_KEY] = "req-1"
    response = await error_middleware(request, handler)
    return response, json.loads(response.text)


async def test_api_error_keeps_status_and_fields():
    async def handler(request):
        raise APIError(404, "no such model", param="model", code="model_not_found")

    response, body = await run_middleware(handler)
    assert response.status == 404
    assert response.content_type == "application/json"
    assert body == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


async def test_unexpected_exception_is_generic_500_and_logged(caplog):
    async def handler(request):
        raise RuntimeError("secret at /opt/app/x.py talking to 10.0.0.5:8001")

    with caplog.at_level(logging.ERROR, logger="proxy"):
        response, body = await run_middleware(handler)

    assert response.status == 500
    assert body["error"]["type"] == "server_error"
    assert body["error"]["message"] == "internal server error (request id req-1)"
    assert "secret" not in response.text and "10.0.0.5" not in response.text
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "secret at /opt/app/x.py" in str(logged[0].exc_info[1])


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (web.HTTPNotFound(), 404, "not_found"),
        (web.HTTPMethodNotAllowed("GET", ["POST"]), 405, "method_not_allowed"),
        (web.HTTPRequestEntityTooLarge(max_size=1024, actual_size=4096), 413, "request_too_large"),
    ],
)
async def test_aiohttp_http_errors_become_envelopes(exc, status, code):
    async def handler(request):
        raise exc

    response, body = await run_middleware(handler, max_size=1024)
    assert response.status == status
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_405_keeps_allow_header():
    async def handler(request):
        raise web.HTTPMethodNotAllowed("GET", ["POST"])

    response, _ = await run_middleware(handler, method="GET")
    assert response.headers["Allow"] == "POST"


async def test_413_message_states_the_limit():
    async def handler(request):
        raise web.HTTPRequestEntityTooLarge(max_size=2048, actual_size=4096)

    _, body = await run_middleware(handler, max_size=2048)
    assert "2048" in body["error"]["message"]


async def test_404_message_names_the_route():
    async def handler(request):
        raise web.HTTPNotFound()

    _, body = await run_middleware(handler, method="GET", path="/v1/nope")
    assert body["error"]["message"] == "Invalid URL (GET /v1/nope)"


async def test_successful_response_passes_through():
    async def handler(request):
        return web.json_response({"ok": True})

    _, body = await run_middleware(handler)
    assert body == {"ok": True}
