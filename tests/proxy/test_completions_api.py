"""`POST /v1/completions` against a scripted backend: prompts (text, lists, token ids) as raw
prompts, choice numbering, echo, legacy logprobs, best_of, streaming, usage and errors."""

from __future__ import annotations

import asyncio

import pytest
from hardening_helpers import assert_envelope
from helpers import sse_payloads
from proxy_fakes import SERVED_MODEL, FakeBackend, logprob_entry
from tritonclient.utils import InferenceServerException

from proxy.api.completions.routes import merged
from proxy.transport.backend import GenerationChunk, model_error
from proxy.transport.contract import ModelError, Task

URL = "/v1/completions"


def choices_script(
    texts_by_choice: list[list[str]], logprobs: list[float] | None = None, prompt_tokens: int = 3
) -> list[GenerationChunk]:
    """Chunks of several choices, interleaved token by token; choice j's tokens have logprob
    `logprobs[j]` each (so its mean is that), and its last chunk finishes it with stop."""
    chunks = []
    for step in range(max(len(texts) for texts in texts_by_choice)):
        for index, texts in enumerate(texts_by_choice):
            if step >= len(texts):
                continue
            text = texts[step]
            value = logprobs[index] if logprobs else -0.5
            chunks.append(
                GenerationChunk(
                    text=text,
                    finish_reason="stop" if step == len(texts) - 1 else None,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=1,
                    image_tokens=0,
                    logprobs=[logprob_entry(text, value)],
                    index=index,
                )
            )
    return chunks


def model_rejects(param: str) -> FakeBackend:
    error = ModelError("invalid_request", "that is not right", param).encode()
    return FakeBackend(error_at=0, error=model_error(InferenceServerException(msg=error), "r"))


async def test_a_text_prompt_is_sent_as_it_is_with_openais_default_max_tokens(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post(URL, json={"model": SERVED_MODEL, "prompt": "Once upon"})
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == SERVED_MODEL
    assert body["choices"] == [
        {"text": "Hello world!", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 3
    sent = backend.last_request
    assert (sent.messages_json, sent.text_input, sent.input_ids) == (None, "Once upon", None)
    assert sent.sampling_parameters == {"max_tokens": 16}
    assert sent.task is Task.GENERATE and sent.media == {}


@pytest.mark.parametrize(
    ("prompt", "sent"),
    [
        ([5, 6, 7], [(5, 6, 7)]),
        ([[5, 6], [7]], [(5, 6), (7,)]),
        (["a", "b", "c"], ["a", "b", "c"]),
    ],
)
async def test_each_prompt_is_one_generation(make_client, prompt, sent):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post(URL, json={"prompt": prompt, "max_tokens": 5})
    assert response.status == 200
    body = await response.json()
    got = sorted(r.input_ids or r.text_input for r, _ in backend.requests)
    assert got == sorted(sent)
    assert [choice["index"] for choice in body["choices"]] == list(range(len(sent)))
    assert body["usage"]["prompt_tokens"] == 7 * len(sent)
    assert body["usage"]["completion_tokens"] == 3 * len(sent)


async def test_choices_are_numbered_prompt_by_prompt(make_client):
    backend = FakeBackend(choices_script([["a0", "a1"], ["b0"]]))
    client = await make_client(backend)
    response = await client.post(URL, json={"prompt": ["x", "y"], "n": 2})
    body = await response.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "a0a1"),
        (1, "b0"),
        (2, "a0a1"),
        (3, "b0"),
    ]
    assert {r.sampling_parameters["n"] for r, _ in backend.requests} == {2}


async def test_echo_puts_the_prompt_in_front(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = await (await client.post(URL, json={"prompt": "Say: ", "echo": True})).json()
    assert body["choices"][0]["text"] == "Say: Hello world!"
    # token ids: the model gives their text first (the fake's detokenize answers this)
    backend.task_answers[Task.DETOKENIZE] = "<ids>"
    body = await (await client.post(URL, json={"prompt": [4, 5], "echo": True})).json()
    assert body["choices"][0]["text"] == "<ids>Hello world!"
    detokenized, generated = backend.requests[-2:]
    assert detokenized[0].task is Task.DETOKENIZE and detokenized[0].input_ids == (4, 5)
    assert generated[0].task is Task.GENERATE


async def test_legacy_logprobs_shape(make_client):
    backend = FakeBackend(choices_script([["Hi", " there"]], logprobs=[-0.25]))
    client = await make_client(backend)
    body = await (await client.post(URL, json={"prompt": "x", "logprobs": 1})).json()
    assert backend.last_request.sampling_parameters["logprobs"] is True
    assert backend.last_request.sampling_parameters["top_logprobs"] == 1
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Hi", " there"],
        "token_logprobs": [-0.25, -0.25],
        # the model's alternatives (the fake's are the token and "?"), the chosen one included
        "top_logprobs": [{"Hi": -0.25, "?": -1.25}, {" there": -0.25, "?": -1.25}],
        "text_offset": [0, 2],
    }


PROMPT_LOGPROBS = [
    None,
    {
        "7": {"logprob": -1.0, "rank": 2, "decoded_token": " up"},
        "3": {"logprob": -0.5, "rank": 1, "decoded_token": "?"},
    },
    {"8": {"logprob": -2.0, "rank": 1, "decoded_token": "on"}},
]


async def test_echo_with_logprobs_scores_the_prompt_tokens(make_client):
    chunks = choices_script([["!"]], logprobs=[-0.1])
    chunks[0] = GenerationChunk(**{**chunks[0].__dict__, "prompt_logprobs": PROMPT_LOGPROBS})
    backend = FakeBackend(chunks)
    client = await make_client(backend)
    body = {"prompt": "Once upon", "echo": True, "logprobs": 1}
    choice = (await (await client.post(URL, json=body)).json())["choices"][0]
    assert backend.last_request.sampling_parameters["prompt_logprobs"] == 1
    assert choice["text"] == "Once upon!"
    assert choice["logprobs"] == {
        "tokens": ["Once", " up", "on", "!"],  # the first: what the others leave of the prompt
        "token_logprobs": [None, -1.0, -2.0, -0.1],
        "top_logprobs": [None, {"?": -0.5, " up": -1.0}, {"on": -2.0}, {"!": -0.1, "?": -1.1}],
        "text_offset": [0, 4, 7, 9],
    }


async def test_best_of_keeps_the_best_mean_logprob_and_bills_every_choice(make_client):
    script = choices_script([["a", "b"], ["c"], ["d", "e"]], logprobs=[-2.0, -0.5, -1.0])
    backend = FakeBackend(script)
    client = await make_client(backend)
    body = await (await client.post(URL, json={"prompt": "x", "best_of": 3, "n": 2})).json()
    sent = backend.last_request.sampling_parameters
    assert (sent["n"], sent["logprobs"], sent["top_logprobs"]) == (3, True, 0)
    assert [(c["index"], c["text"], c["logprobs"]) for c in body["choices"]] == [
        (0, "c", None),
        (1, "de", None),
    ]
    assert body["usage"]["completion_tokens"] == 5


async def test_a_stream_sends_text_completion_chunks_with_echo_and_usage(make_client):
    backend = FakeBackend(choices_script([["a", "b"], ["c"]]))
    client = await make_client(backend)
    body = {
        "prompt": ["p", "q"],
        "n": 2,
        "stream": True,
        "echo": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post(URL, json=body)
    assert response.status == 200
    events = sse_payloads(await response.text())
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    texts: dict[int, str] = {}
    finished = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "pab", 1: "pc", 2: "qab", 3: "qc"}
    assert finished == {0: "stop", 1: "stop", 2: "stop", 3: "stop"}


async def test_streamed_logprobs_offsets_continue_across_chunks(make_client):
    backend = FakeBackend(choices_script([["ab", "c"]]))
    client = await make_client(backend)
    body = {"prompt": "x", "stream": True, "logprobs": 0}
    events = sse_payloads(await (await client.post(URL, json=body)).text())
    offsets = [e["choices"][0]["logprobs"]["text_offset"] for e in events[:-1]]
    assert offsets == [[0], [2]]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "unsupported_parameter", "suffix"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "invalid_value", "best_of"),
        ({"prompt": "x", "best_of": 2, "stream": True}, "invalid_value", "best_of"),
        ({"prompt": "x", "logprobs": 6}, "invalid_value", "logprobs"),
        ({"prompt": "x", "logprobs": True}, "invalid_type", "logprobs"),
        ({"prompt": ""}, "invalid_value", "prompt"),
        ({"prompt": []}, "invalid_value", "prompt"),
        ({"prompt": [[1], []]}, "invalid_value", "prompt[1]"),
        ({"prompt": ["a", ""]}, "invalid_value", "prompt[1]"),
        ({"prompt": [1, -2]}, "invalid_value", "prompt[1]"),
        ({"prompt": [[1, "a"]]}, "invalid_type", "prompt[0][1]"),
        ({"prompt": 5}, "invalid_type", "prompt"),
        ({"prompt": None}, "invalid_type", "prompt"),
        ({"prompt": ["a", {"b": 1}]}, "invalid_type", "prompt[1]"),
        ({"prompt": "x", "max_tokens": 0}, "invalid_value", "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "invalid_value", "temperature"),
        ({"max_tokens": 3}, "missing_required_parameter", "prompt"),
        ({"prompt": "x", "model": "nope"}, "model_not_found", "model"),
    ],
)
async def test_bad_requests_name_their_parameter(make_client, body, code, param):
    backend = FakeBackend()
    client = await make_client(backend)
    response = await client.post(URL, json=body)
    assert response.status in (400, 404)
    assert assert_envelope(await response.json(), code)["param"] == param
    assert backend.served_requests == []


@pytest.mark.parametrize(
    ("prompt", "extra", "model_param", "client_param"),
    [
        ("x", {}, "text_input", "prompt"),
        (["x", "y"], {}, "messages", "prompt[0]"),
        ([[1, 2]], {}, "input_ids[1]", "prompt[0][1]"),
        ("x", {"best_of": 9}, "n", "best_of"),
        ("x", {"n": 9}, "n", "n"),
    ],
)
async def test_the_models_errors_name_the_clients_field(
    make_client, prompt, extra, model_param, client_param
):
    client = await make_client(model_rejects(model_param))
    response = await client.post(URL, json={"prompt": prompt, **extra})
    assert response.status == 400
    assert assert_envelope(await response.json())["param"] == client_param


async def test_prompts_per_request_are_bounded(make_client):
    backend = FakeBackend()
    client = await make_client(backend, max_prompts=2)
    response = await client.post(URL, json={"prompt": ["a", "b", "c"]})
    assert response.status == 400
    assert assert_envelope(await response.json(), "too_many_prompts")["param"] == "prompt"
    assert (await client.post(URL, json={"prompt": [[1], [2]]})).status == 200


async def test_chat_only_and_unknown_fields_are_named_as_ignored(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    body = {"prompt": "x", "tools": [], "frobnicate": 1, "seed": 4, "stop": ["\n"]}
    response = await client.post(URL, json=body)
    assert response.status == 200
    assert response.headers["X-Ignored-Fields"] == "tools, frobnicate"
    sent = backend.last_request
    assert sent.sampling_parameters == {"max_tokens": 16, "seed": 4, "stop": ["\n"]}
    assert sent.tools_json is None


async def test_a_failing_prompt_ends_the_stream_with_an_error_event(make_client):
    backend = FakeBackend(choices_script([["a", "b", "c"]]), error_at=1, error=busy())
    client = await make_client(backend)
    response = await client.post(URL, json={"prompt": ["x", "y"], "stream": True})
    assert response.status == 200
    events = sse_payloads(await response.text(), strict=False)
    assert events[-1] == "[DONE]"
    assert_envelope(events[-2], "server_busy")


async def test_closing_the_merged_chunks_closes_every_generation():
    closed = []

    async def generation(name):
        try:
            for i in range(100):
                yield GenerationChunk(text=f"{name}{i}")
                await asyncio.sleep(0)
        finally:
            closed.append(name)

    chunks = merged([generation("a"), generation("b")])
    seen = [await anext(chunks) for _ in range(4)]
    await chunks.aclose()
    assert {index for index, _ in seen} <= {0, 1}
    assert sorted(closed) == ["a", "b"]


def busy():
    error = ModelError("busy", "64 requests are waiting").encode()
    return model_error(InferenceServerException(msg=error), "r")
