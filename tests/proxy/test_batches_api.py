"""The Batch API through the openai SDK, on the fake backend with stored state in tmp_path:
files.create then batches.create/retrieve/list/cancel, the output and error files parsed; bad
lines as error-file entries; duplicate custom_ids failing validation; lines retried when the
model is unavailable; every line sent at the batch priority."""

from __future__ import annotations

import json

import openai
import pytest
from helpers import wait_until_async
from proxy_fakes import SERVED_MODEL, FakeBackend, script

from proxy.api.batches import runner as runner_module
from proxy.error_catalogue import BACKEND_UNAVAILABLE
from proxy.transport.contract import LoraAdapter, Priority

FAST = {"state": True, "batch_poll_s": 0.05}


def chat_line(custom_id: str, text: str = "hi", **extra) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": SERVED_MODEL, "messages": [{"role": "user", "content": text}], **extra},
    }


def jsonl(*lines) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


@pytest.fixture
async def sdk(make_client, tmp_path):
    """`await sdk(backend, **settings)`: an AsyncOpenAI client of a fresh app with state."""
    clients = []

    async def make(backend=None, **settings):
        client = await make_client(backend, state_dir=str(tmp_path), **{**FAST, **settings})
        sdk = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0
        )
        clients.append(sdk)
        return sdk

    yield make
    for client in clients:
        await client.close()


async def run_batch(client, content: bytes, endpoint="/v1/chat/completions", **create):
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **create
    )
    assert batch.status == "validating" and batch.input_file_id == uploaded.id
    return await finished(client, batch.id)


async def finished(client, batch_id: str):
    async def ended():
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") else None

    return await wait_until_async(ended, timeout=30, what=f"batch {batch_id} to end")


async def lines_of(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_a_batch_runs_every_line_in_input_order_at_the_batch_priority(sdk):
    backend = FakeBackend(script("Hel", "lo"))
    client = await sdk(backend)
    batch = await run_batch(
        client,
        jsonl(*(chat_line(f"req-{n}", f"line {n}") for n in range(1, 6))),
        metadata={"job": "captions"},
    )
    assert batch.status == "completed" and batch.metadata == {"job": "captions"}
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    assert batch.error_file_id is None
    assert None not in (batch.in_progress_at, batch.finalizing_at, batch.completed_at)
    assert batch.usage.output_tokens == 10 and batch.usage.input_tokens == 35
    output = await lines_of(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == [f"req-{n}" for n in range(1, 6)]
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == "Hello"
    assert len({line["id"] for line in output}) == 5
    assert [request.priority for request, _ in backend.requests] == [Priority.BATCH] * 5
    output_file = await client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output"


async def test_bad_lines_become_error_file_entries_and_the_rest_runs(sdk):
    client = await sdk(FakeBackend(), max_request_bytes=4096)
    content = jsonl(
        chat_line("good-1"),
        b"{not json",
        b"[1, 2]",
        {**chat_line("no-id"), "custom_id": None},
        {**chat_line("get"), "method": "GET"},
        {**chat_line("wrong-url"), "url": "/v1/responses"},
        {**chat_line("no-body"), "body": "text"},
        chat_line("streamed", stream=True),
        chat_line("huge", "x" * 5000),
        b"   ",  # blank lines are not requests
        chat_line("unknown-model", model="nope"),
        chat_line("surrogate", "\ud800"),  # valid JSON, refused by the endpoint by name
        chat_line("good-2"),
    )
    batch = await run_batch(client, content)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 12, "completed": 2, "failed": 10}
    output = await lines_of(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["good-1", "good-2"]
    errors = await lines_of(client, batch.error_file_id)
    by_id = [(line["custom_id"], (line["error"] or {}).get("code")) for line in errors]
    assert by_id == [
        (None, "invalid_json_line"),
        (None, "invalid_json_line"),
        (None, "invalid_batch_line"),
        ("get", "invalid_batch_line"),
        ("wrong-url", "invalid_batch_line"),
        ("no-body", "invalid_batch_line"),
        ("streamed", "invalid_batch_line"),
        (None, "batch_line_too_large"),
        ("unknown-model", None),  # the endpoint's own answers, as interactive
        ("surrogate", None),
    ]
    assert "Line 2 " in errors[0]["error"]["message"]
    assert "method must be POST" in errors[3]["error"]["message"]
    answered = [
        (e["response"]["status_code"], e["response"]["body"]["error"]["code"]) for e in errors[-2:]
    ]
    assert answered == [(404, "model_not_found"), (400, "invalid_unicode")]


async def test_duplicate_custom_ids_fail_validation_with_their_lines(sdk):
    backend = FakeBackend()
    client = await sdk(backend)
    content = jsonl(chat_line("a"), chat_line("b"), chat_line("a"), chat_line("b"))
    batch = await run_batch(client, content)
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(error.code, error.line, error.param) for error in batch.errors.data] == [
        ("duplicate_custom_id", 3, "custom_id"),
        ("duplicate_custom_id", 4, "custom_id"),
    ]
    assert "line 1" in batch.errors.data[0].message
    assert batch.output_file_id is None and backend.requests == []


async def test_an_empty_input_file_fails_validation(sdk):
    client = await sdk()
    batch = await run_batch(client, b"\n\n")
    assert batch.status == "failed" and batch.errors.data[0].code == "empty_file"


async def test_responses_lines_run_through_the_responses_route(sdk):
    client = await sdk(FakeBackend(script("Hi")))
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": SERVED_MODEL, "input": "hello"},
    }
    batch = await run_batch(client, jsonl(line), endpoint="/v1/responses")
    (output,) = await lines_of(client, batch.output_file_id)
    body = output["response"]["body"]
    assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == "Hi"
    # Stored (OpenAI's default) for the batch's owner, as an interactive request would be.
    stored = await client.responses.retrieve(body["id"])
    assert stored.output_text == "Hi"


async def test_batches_list_newest_first_in_pages_and_are_the_keys_own(make_client, tmp_path):
    app_client = await make_client(
        FakeBackend(), state_dir=str(tmp_path), api_key="key-a,key-b", **FAST
    )
    url = str(app_client.make_url("/v1"))
    owner = openai.AsyncOpenAI(base_url=url, api_key="key-a", max_retries=0)
    stranger = openai.AsyncOpenAI(base_url=url, api_key="key-b", max_retries=0)
    try:
        made = [(await run_batch(owner, jsonl(chat_line(f"n{n}")))).id for n in range(3)]
        page = await owner.batches.list(limit=2)
        assert [batch.id for batch in page.data] == [made[2], made[1]] and page.has_more
        rest = await owner.batches.list(limit=2, after=page.data[-1].id)
        assert [batch.id for batch in rest.data] == [made[0]] and not rest.has_more
        everything = [batch.id async for batch in owner.batches.list(limit=1)]  # the SDK pages
        assert everything == made[::-1]
        assert (await stranger.batches.list()).data == []
        with pytest.raises(openai.NotFoundError):
            await stranger.batches.retrieve(made[0])
        with pytest.raises(openai.NotFoundError):
            await stranger.batches.cancel(made[0])
        raw = await app_client.get("/v1/batches?limit=0", headers={"Authorization": "Bearer key-a"})
        assert raw.status == 400 and (await raw.json())["error"]["param"] == "limit"
    finally:
        await owner.close()
        await stranger.close()


async def test_cancelling_ends_the_batch_with_what_was_answered(sdk):
    backend = FakeBackend(script("a", "b", "c"), delay_s=0.2)
    client = await sdk(backend, batch_concurrency=1)
    uploaded = await client.files.create(
        file=("in.jsonl", jsonl(*(chat_line(f"c{n}") for n in range(20)))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def one_done():
        return (await client.batches.retrieve(batch.id)).request_counts.completed >= 1

    await wait_until_async(one_done, timeout=30, what="a first answer")
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    ended = await finished(client, batch.id)
    assert ended.status == "cancelled" and ended.cancelled_at is not None
    counts = ended.request_counts
    assert counts.total == 20 and 1 <= counts.completed < 20 and counts.failed == 0
    output = await lines_of(client, ended.output_file_id)
    assert len(output) == counts.completed
    assert [line["custom_id"] for line in output] == [f"c{n}" for n in range(counts.completed)]
    again = await client.batches.cancel(batch.id)
    assert again.status == "cancelled"


async def test_a_finished_batch_cannot_be_cancelled(sdk):
    client = await sdk()
    batch = await run_batch(client, jsonl(chat_line("x")))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.batches.cancel(batch.id)
    assert caught.value.code == "batch_not_cancellable"


class FlakyBackend(FakeBackend):
    """Unavailable for its first `failures` requests, then the fake model."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def generate(self, request, request_id):
        if self.failures > 0:
            self.failures -= 1
            self.requests.append((request, request_id))
            raise BACKEND_UNAVAILABLE()
        async for chunk in super().generate(request, request_id):
            yield chunk


async def test_a_line_the_model_could_not_take_is_tried_again(sdk, monkeypatch):
    monkeypatch.setattr(runner_module, "RETRY_FIRST_S", 0.01)
    backend = FlakyBackend(failures=3)
    client = await sdk(backend, batch_concurrency=1)
    batch = await run_batch(client, jsonl(chat_line("only")))
    assert batch.request_counts.model_dump() == {"total": 1, "completed": 1, "failed": 0}
    assert len(backend.requests) == 4


async def test_create_checks_its_fields_and_the_input_file(sdk):
    client = await sdk()
    chat_file = await client.files.create(file=("in.jsonl", jsonl(chat_line("a"))), purpose="batch")
    other = await client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    cases = [
        ({"endpoint": "/v1/embeddings"}, "endpoint", openai.BadRequestError),
        ({"completion_window": "1h"}, "completion_window", openai.BadRequestError),
        ({"input_file_id": "file-missing"}, "input_file_id", openai.NotFoundError),
        ({"input_file_id": other.id}, "input_file_id", openai.BadRequestError),
        ({"metadata": {"k": 1}}, "metadata.k", openai.BadRequestError),
    ]
    for change, param, error in cases:
        fields = {
            "input_file_id": chat_file.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **change,
        }
        with pytest.raises(error) as caught:
            await client.batches.create(**fields)
        assert caught.value.param == param, change
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_unknown")


async def test_without_state_the_batch_routes_answer_501(make_client):
    client = await make_client(FakeBackend())
    response = await client.get("/v1/batches")
    assert response.status == 501
    assert (await response.json())["error"]["code"] == "state_disabled"


async def test_a_line_naming_a_lora_adapter_runs_with_it_and_an_unknown_name_is_its_404(sdk):
    backend = FakeBackend(script("ok"))
    backend.loras["sql-lora"] = LoraAdapter("sql-lora", 8)
    client = await sdk(backend)
    adapter, unknown = chat_line("adapter"), chat_line("unknown")
    adapter["body"]["model"], unknown["body"]["model"] = "sql-lora", "no-such-lora"
    batch = await run_batch(client, jsonl(adapter, unknown))
    assert batch.status == "completed"
    (output,) = await lines_of(client, batch.output_file_id)
    (error,) = await lines_of(client, batch.error_file_id)
    assert output["response"]["body"]["model"] == "sql-lora"
    assert error["response"]["status_code"] == 404
    assert [request.lora for request, _ in backend.served_requests] == ["sql-lora"]
