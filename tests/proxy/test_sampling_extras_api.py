"""The sampling extras, usage on every chunk, per-request timings and the repetition guard on
the proxy's HTTP surface, against the scripted backend: what reaches the model, the 400s
naming the parameter, and where each output lands in chat completions (bodies and chunks)."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import sse_payloads
from proxy_fakes import FakeBackend, script

from proxy.observability.metrics import STAGES

URL = "/v1/chat/completions"
TEXT = {"messages": [{"role": "user", "content": "hi"}]}

EXTRAS = {
    "min_tokens": 2,
    "ignore_eos": True,
    "stop_token_ids": [7, 9],
    "logit_bias": {"42": -100, "7": 2.5},
    "min_p": 0.1,
    "include_stop_str_in_output": True,
    "skip_special_tokens": False,
    "prompt_logprobs": 1,
    "repetition_guard": {"ngram": 4, "max_repeats": 3},
}


async def test_the_extras_reach_the_model_as_sampling_parameters(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    resp = await client.post(URL, json={**TEXT, **EXTRAS})
    assert resp.status == 200, await resp.text()
    sent = backend.last_request.sampling_parameters
    assert {name: sent[name] for name in EXTRAS} == EXTRAS
    assert "X-Ignored-Fields" not in resp.headers
    assert backend.last_request.return_timings is False


async def test_the_extras_reach_the_model_from_the_responses_api(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    extras = {name: value for name, value in EXTRAS.items() if name != "prompt_logprobs"}
    resp = await client.post("/v1/responses", json={"input": "hi", **extras})
    assert resp.status == 200, await resp.text()
    sent = backend.last_request.sampling_parameters
    assert {name: sent[name] for name in extras} == extras
    assert "X-Ignored-Fields" not in resp.headers


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("min_tokens", -1, "min_tokens"),
        ("min_tokens", 1.5, "min_tokens"),
        ("ignore_eos", "yes", "ignore_eos"),
        ("stop_token_ids", [1, -2], "stop_token_ids"),
        ("stop_token_ids", "7", "stop_token_ids"),
        ("stop_token_ids", list(range(257)), "stop_token_ids"),
        ("logit_bias", {"abc": 1}, "logit_bias"),
        ("logit_bias", {"5": 101}, "logit_bias"),
        ("logit_bias", {"5": "1"}, "logit_bias.5"),
        ("logit_bias", [5], "logit_bias"),
        ("min_p", 1.5, "min_p"),
        ("include_stop_str_in_output", 1, "include_stop_str_in_output"),
        ("skip_special_tokens", None, None),  # null: not set
        ("prompt_logprobs", 21, "prompt_logprobs"),
        ("repetition_guard", {"ngram": 4}, "repetition_guard"),
        ("repetition_guard", {"ngram": -1, "max_repeats": 2}, "repetition_guard.ngram"),
        ("repetition_guard", {"ngram": 2, "max_repeats": 0}, "repetition_guard.max_repeats"),
        ("repetition_guard", 3, "repetition_guard"),
        ("timings", "yes", "timings"),
        ("stream_options", {"continuous_usage_stats": 1}, "stream_options.continuous_usage_stats"),
    ],
)
async def test_bad_values_are_400s_naming_the_parameter(make_client, field, value, param):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {**TEXT, field: value}
    if field == "stream_options":
        body["stream"] = True
    resp = await client.post(URL, json=body)
    if param is None:
        assert resp.status == 200
        return
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not backend.requests  # refused before anything reached the model


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),  # as vLLM
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": 10, "max_completion_tokens": 5}, "min_tokens"),
    ],
)
async def test_combinations_the_proxy_refuses(make_client, body, param):
    client = await make_client(FakeBackend())
    resp = await client.post(URL, json={**TEXT, **body})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


def flagged(chunks, **fields):
    """`chunks` with `fields` set on the last one."""
    return [*chunks[:-1], dataclasses.replace(chunks[-1], **fields)]


MODEL_TIMINGS = {
    "queue": 0.001,
    "media_decode": 0.0,
    "preprocess": 0.002,
    "vision": 0.0,
    "prefill": 0.003,
    "ttft": 0.006,
    "decode": 0.04,
    "mean_itl": 0.02,
}


async def test_a_non_streamed_body_carries_the_flag_prompt_logprobs_and_timings(make_client):
    prompt = [None, {"12": {"logprob": -1.25, "rank": 3, "decoded_token": "hi"}}]
    chunks = script("a", "b", "c")
    chunks[0] = dataclasses.replace(chunks[0], prompt_logprobs=prompt)
    backend = FakeBackend(flagged(chunks, repetition_detected=True, timings=MODEL_TIMINGS))
    client = await make_client(backend)
    resp = await client.post(URL, json={**TEXT, "prompt_logprobs": 1, "timings": True})
    body = await resp.json()
    assert backend.last_request.return_timings is True
    assert body["choices"][0]["repetition_detected"] is True
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["prompt_logprobs"] == prompt
    timings = body["timings"]
    assert list(timings) == [f"{stage}_ms" for stage in STAGES]
    assert timings["queue_ms"] == 1.0 and timings["decode_ms"] == 40.0
    assert timings["media_fetch_ms"] == 0.0
    assert timings["ttft_ms"] >= 6.0  # the model's, plus the proxy's time before it


async def test_without_asking_there_are_no_timings_flag_or_prompt_logprobs(make_client):
    client = await make_client(FakeBackend(script("a", "b")))
    body = await (await client.post(URL, json=TEXT)).json()
    assert {"timings", "prompt_logprobs"}.isdisjoint(body)
    assert "repetition_detected" not in body["choices"][0]


async def test_the_server_flag_asks_for_timings_on_every_request(make_client):
    backend = FakeBackend(flagged(script("a"), timings=MODEL_TIMINGS))
    client = await make_client(backend, timings=True)
    body = await (await client.post(URL, json=TEXT)).json()
    assert backend.last_request.return_timings is True
    assert body["timings"]["prefill_ms"] == 3.0
    resp = await client.get("/metrics")
    text = await resp.text()
    for stage in STAGES:
        assert f'qwen_vl_proxy_request_stage_seconds_count{{stage="{stage}"}} 1.0' in text


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_timings_and_flag_ride_on_the_last_chunks(make_client, include_usage):
    backend = FakeBackend(
        flagged(script("a", "b"), repetition_detected=True, timings=MODEL_TIMINGS)
    )
    client = await make_client(backend)
    body = {**TEXT, "stream": True, "timings": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    payloads = sse_payloads(await (await client.post(URL, json=body)).text())
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    with_timings = [i for i, chunk in enumerate(chunks) if "timings" in chunk]
    assert with_timings == [len(chunks) - 1]
    assert chunks[-1]["timings"]["decode_ms"] == 40.0
    finish = [
        chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]
    ]
    assert len(finish) == 1 and finish[0]["choices"][0]["repetition_detected"] is True
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


async def test_continuous_usage_puts_the_counts_so_far_on_every_chunk(make_client):
    client = await make_client(FakeBackend(script("a", "b", "c", prompt_tokens=5)))
    body = {**TEXT, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    chunks = sse_payloads(await (await client.post(URL, json=body)).text())[:-1]
    assert all(chunk["usage"] is not None for chunk in chunks)
    completion = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert completion == [0, 1, 2, 3, 3, 3]  # role, three tokens, finish, the usage chunk
    assert all(chunk["usage"]["prompt_tokens"] == 5 for chunk in chunks)
    assert all(
        chunk["usage"]["total_tokens"] == 5 + chunk["usage"]["completion_tokens"]
        for chunk in chunks
    )
    assert chunks[-1]["choices"] == []  # the usage chunk, as with include_usage


async def test_without_continuous_usage_chunks_keep_usage_null(make_client):
    client = await make_client(FakeBackend(script("a", "b")))
    body = {**TEXT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse_payloads(await (await client.post(URL, json=body)).text())[:-1]
    assert [chunk["usage"] is None for chunk in chunks] == [True] * (len(chunks) - 1) + [False]


async def test_a_bad_extra_on_the_responses_api_names_its_field(make_client):
    client = await make_client(FakeBackend())
    resp = await client.post("/v1/responses", json={"input": "hi", "logit_bias": {"x": 1}})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "logit_bias"


def test_the_responses_extras_are_chat_fields():
    from proxy.api.responses.protocol import SAMPLING_EXTRAS
    from proxy.request.schema import ChatCompletionRequest

    assert set(SAMPLING_EXTRAS) <= set(ChatCompletionRequest.model_fields)
