"""The proxy adopts the limits the model describes, and its flags only narrow them."""

from __future__ import annotations

import asyncio

import pytest
from helpers import data_url
from proxy_fakes import PNG_BYTES, FakeBackend

from proxy.transport.backend import backend_unavailable
from proxy.transport.contract import ModelLimits
from proxy.transport.model_limits import RETRY_AFTER_FAILURE_S, ModelLimitsBook

IMAGE = {"type": "image_url", "image_url": {"url": data_url(PNG_BYTES)}}


def images_request(count: int, **fields) -> dict:
    return {"messages": [{"role": "user", "content": [IMAGE] * count}], **fields}


async def post(client, body: dict) -> tuple[int, dict]:
    resp = await client.post("/v1/chat/completions", json=body)
    return resp.status, await resp.json()


def backend_with(limits) -> FakeBackend:
    backend = FakeBackend()
    backend.limits = limits
    return backend


async def test_the_models_image_limit_applies_without_a_proxy_flag(make_client):
    backend = backend_with(ModelLimits(max_images=2))
    client = await make_client(backend)
    status, body = await post(client, images_request(3))
    assert status == 400 and body["error"]["code"] == "too_many_images"
    assert "at most 2" in body["error"]["message"]
    assert backend.requests == []  # refused before the model saw it
    status, _ = await post(client, images_request(2))
    assert status == 200


async def test_a_flag_narrows_but_never_widens_the_models_limit(make_client):
    narrowed = await make_client(backend_with(ModelLimits(max_images=4)), max_images=1)
    assert (await post(narrowed, images_request(2)))[0] == 400
    widened = await make_client(backend_with(ModelLimits(max_images=2)), max_images=8)
    status, body = await post(widened, images_request(3))
    assert status == 400 and "at most 2" in body["error"]["message"]


async def test_max_tokens_and_pixel_budgets_follow_the_model(make_client):
    backend = backend_with(ModelLimits(max_tokens=64, min_pixels=784, max_pixels=200_704))
    client = await make_client(backend)
    status, _ = await post(client, images_request(1, max_tokens=1000))
    assert status == 200
    request = backend.last_request
    assert request.sampling_parameters["max_tokens"] == 64
    assert '"min_pixels": 784, "max_pixels": 200704' in request.messages_json
    status, body = await post(client, images_request(1, max_pixels=1_003_520))
    assert status == 400 and body["error"]["param"] == "max_pixels"  # outside the model's range


async def test_the_proxys_max_tokens_flag_is_the_lower_of_the_two(make_client):
    backend = backend_with(ModelLimits(max_tokens=64))
    client = await make_client(backend, max_tokens_limit=16)
    await post(client, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    assert backend.last_request.sampling_parameters["max_tokens"] == 16


async def test_a_model_without_describe_gets_the_contract_defaults(make_client):
    backend = backend_with(None)
    client = await make_client(backend)
    status, body = await post(client, images_request(17))
    assert status == 400 and "at most 16" in body["error"]["message"]


async def test_models_list_the_context_length_the_model_reports(make_client):
    client = await make_client(backend_with(ModelLimits(context_length=4096)))
    await post(client, {"messages": [{"role": "user", "content": "hi"}]})
    card = (await (await client.get("/v1/models")).json())["data"][0]
    assert card["max_model_len"] == 4096


# ---- the book ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_model_that_cannot_be_asked_is_asked_again_after_a_pause():
    backend = backend_with(backend_unavailable())
    clock = Clock()
    book = ModelLimitsBook(backend, clock=clock)
    assert await book.get("m") == ModelLimits()
    assert await book.get("m") == ModelLimits()
    assert backend.describe_calls == ["m"]  # not once per request while Triton is down
    backend.limits = ModelLimits(max_images=3)
    clock.now += RETRY_AFTER_FAILURE_S
    assert (await book.get("m")).max_images == 3
    assert (await book.get("m")).max_images == 3
    assert backend.describe_calls == ["m", "m"]  # then known


async def test_concurrent_first_requests_share_one_question():
    backend = backend_with(ModelLimits(max_images=5))
    book = ModelLimitsBook(backend)
    answers = await asyncio.gather(*(book.get("m") for _ in range(8)))
    assert {limits.max_images for limits in answers} == {5}
    assert backend.describe_calls == ["m"]


async def test_an_outage_makes_the_book_ask_again():
    backend = backend_with(ModelLimits(max_images=5))
    book = ModelLimitsBook(backend)
    await book.get("m")
    with pytest.raises(Exception), book.forgotten_on_outage("m"):  # noqa: B017
        raise backend_unavailable()
    backend.limits = ModelLimits(max_images=7)
    assert (await book.get("m")).max_images == 7
