"""The `priority` field on the proxy's side: a client's class reaches the model's `priority`
input through chat completions and Responses, a bad value is a 400 naming it, and a caller of
the shared request path (the Batch API) can impose the batch class whatever the body says."""

from __future__ import annotations

import contextlib

import pytest
from aiohttp import web
from proxy_fakes import TEST_CONFIG, FakeBackend, serving_app

from proxy.app import create_app
from proxy.request.generation import read_json_object, start_generation
from proxy.request.schema import parse_chat_request
from proxy.transport.backend import build_inputs
from proxy.transport.contract import Input, Priority

ROUTES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"input": "hi"},
}


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (None, Priority.INTERACTIVE),
        ("interactive", Priority.INTERACTIVE),
        ("batch", Priority.BATCH),
    ],
)
async def test_the_class_a_client_names_reaches_the_model(make_client, path, sent, expected):
    backend = FakeBackend()
    client = await make_client(backend)
    body = ROUTES[path] if sent is None else {**ROUTES[path], "priority": sent}
    response = await client.post(path, json=body)
    assert response.status == 200, await response.text()
    assert "X-Ignored-Fields" not in response.headers
    assert backend.last_request.priority is expected
    sent_inputs = {tensor.name() for tensor in build_inputs(backend.last_request)}
    assert (Input.PRIORITY in sent_inputs) == (expected is Priority.BATCH)


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize("bad", ["urgent", "BATCH", "", 1, True, ["batch"]])
async def test_an_unknown_class_is_a_400_naming_priority(make_client, path, bad):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post(path, json={**ROUTES[path], "priority": bad})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "priority" and error["type"] == "invalid_request_error"
    assert "priority" in error["message"]
    assert backend.requests == []


async def test_a_caller_of_the_shared_path_imposes_the_batch_class():
    """What the Batch API does for each line: its body's own `priority` does not count."""

    async def batch_line(request):
        chat = parse_chat_request(await read_json_object(request))
        generation = await start_generation(request, chat, priority=Priority.BATCH)
        async with contextlib.aclosing(generation.chunks) as chunks:
            text = "".join([chunk.text async for chunk in chunks])
        return web.json_response({"text": text})

    backend = FakeBackend()
    app = create_app(TEST_CONFIG, backend)
    app.router.add_post("/test/batch-line", batch_line)
    async with serving_app(app) as client:
        body = {**ROUTES["/v1/chat/completions"], "priority": "interactive"}
        response = await client.post("/test/batch-line", json=body)
        assert response.status == 200, await response.text()
        assert (await response.json())["text"] == "Hello world!"
    assert backend.last_request.priority is Priority.BATCH
