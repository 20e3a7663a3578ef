"""Stored responses (proxy/api/responses/routes.py, background.py, conversation.py) against the
scripted backend, through the official SDK where it has the call: `store`, retrieve, delete,
input items, `previous_response_id` sending earlier images to the model again, background
responses polled and cancelled, tenancy, expiry, bounds, and what a restart finds.

Each test's proxy keeps its state in a SQLite file under the test's tmp_path (the storage
layer itself runs on both engines: tests/unit/test_state_responses.py); one conversation test
runs on PostgreSQL too."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from helpers import data_url, wait_until_async
from proxy_fakes import JPEG_BYTES, PNG_BYTES, TEST_CONFIG, FakeBackend, script, serving

from proxy.api.responses import background
from proxy.api.responses import routes as response_routes
from proxy.config import with_settings
from proxy.state.blobs import BlobStore
from proxy.state.db import Database, sqlite_url
from proxy.state.responses import IN_PROGRESS, NewResponse, ResponseStore

IMAGE_TURN = [
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is in this image?"},
            {"type": "input_image", "image_url": data_url(JPEG_BYTES, "image/jpeg")},
        ],
    }
]
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


@pytest.fixture
async def stateful(make_client, tmp_path):
    """`await stateful(backend, **settings)`: (TestClient, AsyncOpenAI) of a fresh app that
    keeps its state under tmp_path."""
    clients: list[httpx.AsyncClient] = []

    async def make(backend: FakeBackend, api_key: str = "unused", **settings: Any):
        settings = {"state": True, "state_dir": str(tmp_path), **settings}
        server = await make_client(backend, **settings)
        http = httpx.AsyncClient(trust_env=False)
        clients.append(http)
        sdk = openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key=api_key, max_retries=0, http_client=http
        )
        return server, sdk

    yield make
    for http in clients:
        await http.aclose()


async def finished(sdk: openai.AsyncOpenAI, response_id: str) -> Any:
    """Polls until the response has a terminal status."""

    async def done():
        response = await sdk.responses.retrieve(response_id)
        return response if response.status in TERMINAL else None

    return await wait_until_async(done, what=f"{response_id} to finish")


# ---- store, retrieve, delete, input items ------------------------------------------------


async def test_a_stored_response_is_retrieved_then_deleted(stateful):
    backend = FakeBackend(script("A", " cat", ".", prompt_tokens=20, image_tokens=4))
    client, sdk = await stateful(backend)

    raw = await client.post("/v1/responses", json={"input": IMAGE_TURN, "metadata": {"k": "v"}})
    assert raw.status == 200 and raw.headers["X-Response-Stored"] == "true"
    created = await raw.json()
    assert created["store"] is True and created["previous_response_id"] is None

    retrieved = await sdk.responses.retrieve(created["id"])
    assert retrieved.model_dump(exclude_unset=True) == created
    assert retrieved.output_text == "A cat." and retrieved.usage.input_tokens == 20

    await sdk.responses.delete(created["id"])
    deleted = await client.delete(f"/v1/responses/{created['id']}")
    assert deleted.status == 404
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.responses.retrieve(created["id"])
    assert caught.value.body["message"] == f"Response with id '{created['id']}' not found."


async def test_delete_answers_openais_shape(stateful):
    client, sdk = await stateful(FakeBackend())
    created = await sdk.responses.create(input="Hi")
    resp = await client.delete(f"/v1/responses/{created.id}")
    assert await resp.json() == {"id": created.id, "object": "response", "deleted": True}


async def test_store_false_keeps_nothing(stateful):
    client, sdk = await stateful(FakeBackend())
    raw = await client.post("/v1/responses", json={"input": "Hi", "store": False})
    assert raw.headers["X-Response-Stored"] == "false"
    body = await raw.json()
    assert body["store"] is False
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(body["id"])


async def test_a_streamed_response_is_stored_before_its_terminal_event(stateful):
    client, sdk = await stateful(FakeBackend(script("A", " cat", ".")))
    events = [event async for event in await sdk.responses.create(input="Hi", stream=True)]
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.store is True
    assert (await sdk.responses.retrieve(final.id)).model_dump() == final.model_dump()


async def test_input_items_are_listed_in_pages_in_both_orders(stateful):
    client, sdk = await stateful(FakeBackend())
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "id": "msg_mine"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        *IMAGE_TURN,
    ]
    created = await sdk.responses.create(input=history)

    page = await sdk.responses.input_items.list(created.id, limit=2)
    assert [item.role for item in page.data] == ["user", "assistant"]  # newest first
    assert page.has_more and page.last_id == page.data[-1].id
    everything = [item async for item in sdk.responses.input_items.list(created.id, limit=2)]
    assert [item.role for item in everything] == ["user", "assistant", "user", "system"]
    assert everything[2].id == "msg_mine"  # a client's item id is kept
    ascending = await sdk.responses.input_items.list(created.id, order="asc", limit=100)
    assert [item.id for item in ascending.data] == [item.id for item in reversed(everything)]
    image = everything[0].content[1]
    assert (image.type, image.detail) == ("input_image", "auto")
    assert image.image_url == data_url(JPEG_BYTES, "image/jpeg")  # rebuilt from the blob
    assert everything[0].content[0].text == "What is in this image?"
    raw = await client.get(f"/v1/responses/{created.id}/input_items?limit=2")
    body = await raw.json()
    assert set(body) == {"object", "data", "first_id", "last_id", "has_more"}
    assert body["object"] == "list" and body["first_id"] == body["data"][0]["id"]


async def test_a_string_input_is_one_user_message(stateful):
    client, sdk = await stateful(FakeBackend())
    created = await sdk.responses.create(input="Describe a cat.")
    (item,) = (await sdk.responses.input_items.list(created.id)).data
    assert (item.type, item.role, item.content[0].text) == ("message", "user", "Describe a cat.")
    assert item.id.startswith("msg_")


@pytest.mark.parametrize(
    "query, param",
    [("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("order=up", "order")],
)
async def test_bad_list_parameters_name_themselves(stateful, query, param):
    client, sdk = await stateful(FakeBackend())
    created = await sdk.responses.create(input="Hi")
    resp = await client.get(f"/v1/responses/{created.id}/input_items?{query}")
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("invalid_value", param)


# ---- conversations ------------------------------------------------------------------------


async def check_image_conversation(stateful, **settings: Any) -> None:
    backend = FakeBackend(script("A", " cat", "."))
    client, sdk = await stateful(backend, **settings)
    first = await sdk.responses.create(input=IMAGE_TURN, instructions="You are a cat.")
    assert backend.last_request.media["image"] == [JPEG_BYTES]

    backend.chunks = script("It", " is", " grey.")
    second = await sdk.responses.create(input="What colour is it?", previous_response_id=first.id)

    # The turn-1 image reached the model again; the client sent only text.
    assert backend.last_request.media["image"] == [JPEG_BYTES]
    messages = json.loads(backend.last_request.messages_json)
    assert messages == [  # instructions are not carried over (OpenAI's rule)
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                messages[0]["content"][1],
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "What colour is it?"},
    ]
    assert messages[0]["content"][1]["type"] == "image"
    assert second.previous_response_id == first.id and second.output_text == "It is grey."

    backend.chunks = script("Yes.")
    await sdk.responses.create(
        input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": data_url(PNG_BYTES)}]}
        ],
        previous_response_id=second.id,
    )
    # Three turns: the first turn's image, then this turn's own, in order.
    assert backend.last_request.media["image"] == [JPEG_BYTES, PNG_BYTES]
    roles = [m["role"] for m in json.loads(backend.last_request.messages_json)]
    assert roles == ["user", "assistant", "user", "assistant", "user"]


async def test_previous_response_id_sends_the_earlier_image_again(stateful):
    await check_image_conversation(stateful)


async def test_previous_response_id_on_postgresql(stateful, postgres_url):
    await check_image_conversation(stateful, database_url=postgres_url)


async def test_a_streamed_turn_continues_a_conversation(stateful):
    backend = FakeBackend(script("A", " cat", "."))
    client, sdk = await stateful(backend)
    first = await sdk.responses.create(input=IMAGE_TURN)
    events = [
        event
        async for event in await sdk.responses.create(
            input="And?", previous_response_id=first.id, stream=True
        )
    ]
    assert events[-1].response.previous_response_id == first.id
    assert backend.last_request.media["image"] == [JPEG_BYTES]


async def test_an_earlier_function_call_is_history_too(stateful):
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    backend = FakeBackend(script(call))
    client, sdk = await stateful(backend)
    first = await sdk.responses.create(input="Weather in Paris?", tools=[tool])
    (fc,) = first.output
    backend.chunks = script("Sunny.")
    await sdk.responses.create(
        input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}],
        previous_response_id=first.id,
        tools=[tool],
    )
    messages = json.loads(backend.last_request.messages_json)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == fc.call_id


async def test_the_conversation_is_bounded_in_turns(stateful):
    backend = FakeBackend()
    client, sdk = await stateful(backend, responses_max_history_turns=2)
    one = await sdk.responses.create(input="1")
    two = await sdk.responses.create(input="2", previous_response_id=one.id)
    three = await sdk.responses.create(input="3", previous_response_id=two.id)
    sent = len(backend.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(input="4", previous_response_id=three.id)
    assert caught.value.code == "conversation_too_long"
    assert caught.value.param == "previous_response_id"
    assert len(backend.requests) == sent


async def test_history_errors_name_previous_response_id(stateful):
    two_images = [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": data_url(PNG_BYTES)},
                {"type": "input_image", "image_url": data_url(JPEG_BYTES, "image/jpeg")},
            ],
        }
    ]
    client, sdk = await stateful(FakeBackend())
    first = await sdk.responses.create(input=two_images)
    # The same database, a proxy that takes one image per request: the second stored image
    # is the one over the limit, and it came from no field of this request.
    client, narrower = await stateful(FakeBackend(), max_images=1)
    with pytest.raises(openai.BadRequestError) as caught:
        await narrower.responses.create(input="Again", previous_response_id=first.id)
    assert (caught.value.code, caught.value.param) == ("too_many_images", "previous_response_id")


# ---- images from the Files API ---------------------------------------------------------------


def _file_image_turn(file_id: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "And this one?"},
                {"type": "input_image", "file_id": file_id, "detail": "low"},
            ],
        }
    ]


async def test_an_uploaded_image_is_named_by_file_id(stateful):
    backend = FakeBackend(script("A", " dog."))
    client, sdk = await stateful(backend)
    uploaded = await sdk.files.create(file=("dog.png", PNG_BYTES, "image/png"), purpose="vision")
    first = await sdk.responses.create(input=_file_image_turn(uploaded.id))
    assert first.output_text == "A dog."
    assert backend.last_request.media["image"] == [PNG_BYTES]
    by_file = json.loads(backend.last_request.messages_json)
    # exactly what the same image sent inline becomes (its detail's budget included)
    inline = _file_image_turn("")
    inline[0]["content"][1] = {
        "type": "input_image",
        "image_url": data_url(PNG_BYTES),
        "detail": "low",
    }
    await sdk.responses.create(input=inline, store=False)
    assert by_file == json.loads(backend.last_request.messages_json)
    # The stored turn holds the bytes: the file may go, the conversation goes on.
    await sdk.files.delete(uploaded.id)
    backend.chunks = script("Brown.")
    await sdk.responses.create(input="Its colour?", previous_response_id=first.id)
    assert backend.last_request.media["image"] == [PNG_BYTES]


@pytest.mark.parametrize(
    "upload, status, code",
    [
        (None, 404, None),  # no such file
        (("notes.txt", b"not an image at all", "text/plain"), 400, "invalid_image"),
        (("big.png", PNG_BYTES + bytes(2048), "image/png"), 400, "image_too_large"),
    ],
)
async def test_a_bad_image_file_id_names_the_part(stateful, upload, status, code):
    backend = FakeBackend()
    client, sdk = await stateful(backend, max_image_bytes=1024)
    file_id = "file-" + "0" * 24
    if upload is not None:
        file_id = (await sdk.files.create(file=upload, purpose="user_data")).id
    resp = await client.post("/v1/responses", json={"input": _file_image_turn(file_id)})
    error = (await resp.json())["error"]
    assert resp.status == status, error
    assert error["param"] == "input[0].content[1].file_id"
    assert code is None or error["code"] == code
    assert backend.requests == []


async def test_another_tenants_file_is_unknown(make_client, tmp_path):
    backend = FakeBackend()
    client = await make_client(
        backend, state=True, state_dir=str(tmp_path), api_key="key-one,key-two"
    )
    form = {"purpose": "vision", "file": PNG_BYTES}
    uploaded = await client.post(
        "/v1/files", data=form, headers={"Authorization": "Bearer key-one"}
    )
    file_id = (await uploaded.json())["id"]
    resp = await client.post(
        "/v1/responses",
        json={"input": _file_image_turn(file_id)},
        headers={"Authorization": "Bearer key-two"},
    )
    assert resp.status == 404
    assert (await resp.json())["error"]["param"] == "input[0].content[1].file_id"
    assert backend.requests == []


# ---- tenancy and expiry -------------------------------------------------------------------


async def test_other_tenants_get_404_as_for_an_unknown_id(make_client, tmp_path):
    backend = FakeBackend()
    client = await make_client(
        backend, state=True, state_dir=str(tmp_path), api_key="key-one,key-two"
    )
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    created = await (await client.post("/v1/responses", json={"input": "Hi"}, headers=one)).json()
    rid = created["id"]
    assert (await client.get(f"/v1/responses/{rid}", headers=one)).status == 200

    async def answer(method: str, path: str, headers: dict, **kwargs) -> tuple[int, dict]:
        resp = await client.request(method, path, headers=headers, **kwargs)
        return resp.status, await resp.json()

    unknown = "resp_" + "0" * 32
    for method, path in (
        ("GET", "/v1/responses/{}"),
        ("GET", "/v1/responses/{}/input_items"),
        ("POST", "/v1/responses/{}/cancel"),
        ("DELETE", "/v1/responses/{}"),
    ):
        other = await answer(method, path.format(rid), two)
        never = await answer(method, path.format(unknown), two)
        assert other[0] == never[0] == 404
        assert json.dumps(other[1]).replace(rid, unknown) == json.dumps(never[1])
    previous = await answer(
        "POST", "/v1/responses", two, json={"input": "x", "previous_response_id": rid}
    )
    assert previous[0] == 404
    assert previous[1]["error"] == {
        "message": f"Previous response with id '{rid}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
    # The owner still has it all.
    assert (await client.get(f"/v1/responses/{rid}", headers=one)).status == 200


async def test_an_expired_response_is_unknown(stateful, monkeypatch):
    client, sdk = await stateful(FakeBackend(), state_retention_s=3600)
    created = await sdk.responses.create(input="Hi")
    later = time.time() + 3600
    monkeypatch.setattr(response_routes, "now", lambda: later)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.responses.create(input="Again", previous_response_id=created.id)
    assert caught.value.code == "previous_response_not_found"


# ---- background ---------------------------------------------------------------------------


async def test_a_background_response_is_queued_then_polled_to_its_end(stateful):
    backend = FakeBackend(script("A", " cat", "."), delay_s=0.05)
    client, sdk = await stateful(backend)
    created = await sdk.responses.create(input=IMAGE_TURN, background=True)
    assert (created.status, created.background, created.output) == ("queued", True, [])
    done = await finished(sdk, created.id)
    assert done.status == "completed" and done.output_text == "A cat."
    assert done.usage.output_tokens == 3 and done.background is True
    assert backend.last_request.media["image"] == [JPEG_BYTES]
    # It is a stored response like any other: a conversation continues from it.
    await sdk.responses.create(input="More?", previous_response_id=created.id)
    assert backend.last_request.media["image"] == [JPEG_BYTES]


async def test_a_background_response_fails_with_the_models_error(stateful):
    backend = FakeBackend(script("a", "b"), error_at=1, error=RuntimeError("secret boom"))
    client, sdk = await stateful(backend)
    created = await sdk.responses.create(input="Hi", background=True)
    done = await finished(sdk, created.id)
    assert done.status == "failed" and done.error.code == "internal_error"
    assert "secret" not in done.error.message


async def test_cancel_stops_the_generation(stateful):
    backend = FakeBackend(script(*(f"t{i}" for i in range(200))), delay_s=0.05)
    client, sdk = await stateful(backend)
    created = await sdk.responses.create(input="Hi", background=True)
    await wait_until_async(lambda: backend.requests, what="the generation to start")

    cancelled = await sdk.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    await asyncio.wait_for(backend.stopped_early.wait(), 5.0)
    assert not backend.finished
    assert (await sdk.responses.retrieve(created.id)).status == "cancelled"
    again = await sdk.responses.cancel(created.id)  # cancelling twice answers it again
    assert again.status == "cancelled"


async def test_a_cancel_through_another_replica_stops_the_generation(
    make_client, tmp_path, monkeypatch
):
    """Two proxies on one database: the one running the response learns of a cancel made
    through the other at its next lease renewal."""
    monkeypatch.setattr(background, "HEARTBEAT_S", 0.05)
    settings = {"state": True, "state_dir": str(tmp_path)}
    running = FakeBackend(script(*(f"t{i}" for i in range(400))), delay_s=0.05)
    first = await make_client(running, **settings)
    second = await make_client(FakeBackend(), **settings)
    created = await (
        await first.post("/v1/responses", json={"input": "Hi", "background": True})
    ).json()
    await wait_until_async(lambda: running.requests, what="the generation to start")

    cancelled = await second.post(f"/v1/responses/{created['id']}/cancel")
    assert (await cancelled.json())["status"] == "cancelled"
    await asyncio.wait_for(running.stopped_early.wait(), 10.0)
    assert not running.finished
    body = await (await first.get(f"/v1/responses/{created['id']}")).json()
    assert body["status"] == "cancelled"


async def test_only_running_background_responses_can_be_cancelled(stateful):
    client, sdk = await stateful(FakeBackend())
    sync = await sdk.responses.create(input="Hi")
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.cancel(sync.id)
    assert caught.value.body["message"] == "Cannot cancel a synchronous response."
    assert caught.value.code == "response_not_cancellable"
    background = await sdk.responses.create(input="Hi", background=True)
    await finished(sdk, background.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.cancel(background.id)
    assert caught.value.body["message"] == "Cannot cancel a response that is already completed."


async def test_continuing_a_running_response_is_refused(stateful):
    backend = FakeBackend(script(*(f"t{i}" for i in range(200))), delay_s=0.05)
    client, sdk = await stateful(backend)
    created = await sdk.responses.create(input="Hi", background=True)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(input="And?", previous_response_id=created.id)
    assert caught.value.param == "previous_response_id"
    await sdk.responses.cancel(created.id)


async def test_a_background_response_holds_an_in_flight_slot(stateful):
    backend = FakeBackend(script(*(f"t{i}" for i in range(200))), delay_s=0.05)
    client, sdk = await stateful(backend, max_concurrent_requests=2)
    created = await sdk.responses.create(input="Hi", background=True)
    with pytest.raises(openai.RateLimitError):
        await sdk.responses.create(input="Hi", background=True)
    await wait_until_async(lambda: backend.requests, what="the generation to start")
    await sdk.responses.cancel(created.id)
    await asyncio.wait_for(backend.stopped_early.wait(), 5.0)


async def test_a_bad_background_request_is_refused_at_once(stateful):
    backend = FakeBackend()
    client, sdk = await stateful(backend)
    bad = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(b"no")}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(input=bad, background=True)
    assert (caught.value.code, caught.value.param) == (
        "invalid_image",
        "input[0].content[0].image_url",
    )
    assert backend.requests == []


# ---- restarts -----------------------------------------------------------------------------


async def test_a_response_running_when_the_proxy_stops_is_failed(tmp_path):
    backend = FakeBackend(script(*(f"t{i}" for i in range(200))), delay_s=0.05)
    config = with_settings(TEST_CONFIG, state=True, state_dir=str(tmp_path))
    async with serving(config, backend) as client:
        created = await (
            await client.post("/v1/responses", json={"input": "Hi", "background": True})
        ).json()
        await wait_until_async(lambda: backend.requests, what="the generation to start")
    async with serving(config, FakeBackend()) as client:
        body = await (await client.get(f"/v1/responses/{created['id']}")).json()
    assert body["status"] == "failed" and body["error"]["code"] == "server_shutting_down"
    assert backend.stopped_early.is_set()


async def test_a_response_left_running_by_a_dead_process_is_failed_at_start(tmp_path):
    """A process killed mid-generation writes nothing: its lease lapses, and the next proxy to
    start (or any replica's lease keeper) marks the response failed."""
    database = await Database.open(sqlite_url(tmp_path))
    store = ResponseStore(database, BlobStore(database))
    lapsed = time.time() - 3600
    body = {"id": "resp_orphan", "object": "response", "status": IN_PROGRESS, "output": []}
    await store.create(
        NewResponse(
            id="resp_orphan",
            tenant="anonymous",
            body=body,
            input_items=[],
            images={},
            created_at=lapsed,
            expires_at=None,
            background=True,
            owner="a-process-that-was-killed",
        )
    )
    await database.close()
    config = with_settings(TEST_CONFIG, state=True, state_dir=str(tmp_path))
    async with serving(config, FakeBackend()) as client:

        async def failed():
            found = await (await client.get("/v1/responses/resp_orphan")).json()
            return found if found["status"] == "failed" else None

        found = await wait_until_async(failed, what="the orphan to be failed")
    assert found["error"]["code"] == "background_interrupted"
