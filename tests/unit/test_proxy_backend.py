"""TritonBackend without a server: the tensors it sends, how it reads responses, and the
stream lifecycle (final detection, cancellation, error mapping) against a scripted client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
)

from proxy.errors import APIError
from proxy.transport import backend as backend_module
from proxy.transport.backend import (
    GenerationChunk,
    PromptOptions,
    TritonBackend,
    TritonRequest,
    build_inputs,
    is_final_response,
    model_error,
    parse_response,
)
from proxy.transport.contract import INPUTS, ModelError, Priority, Task

REQUEST = TritonRequest(
    model="qwen2_5_vl",
    messages_json=json.dumps(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "猫?"}]}],
        ensure_ascii=False,
    ),
    media={"image": [b"\x89PNG\r\n\x1a\nA", b"\xff\xd8\xffB\x00"]},
    sampling_parameters={"max_tokens": 4, "stop": ["x"]},
    stream=True,
)


# ---- the tensors sent ----------------------------------------------------------------------


def tensors(request: TritonRequest) -> dict:
    # _get_content() is the raw tensor payload tritonclient puts on the wire.
    return {t.name(): t for t in build_inputs(request)}


def bytes_values(tensor) -> list[bytes]:
    return list(deserialize_bytes_tensor(tensor._get_content()))


def test_inputs_follow_the_tensor_contract():
    inputs = tensors(REQUEST)

    # every input the contract names but the ready-prompt and describe ones
    # no tools, no videos sent, no priority for the default class, no timings unless asked
    assert set(inputs) == set(INPUTS) - {
        "text_input",
        "describe",
        "tools",
        "video",
        "priority",
        "return_timings",
        # a raw prompt's and the tasks' inputs, each sent only when it says something
        "input_ids",
        "task",
        "add_generation_prompt",
        "add_special_tokens",
        "return_token_strs",
        # the base model's request names no adapter
        "lora",
        "lora_path",
    }
    assert (inputs["messages"].datatype(), inputs["messages"].shape()) == ("BYTES", [1])
    assert bytes_values(inputs["messages"]) == [REQUEST.messages_json.encode("utf-8")]
    assert (inputs["image"].datatype(), inputs["image"].shape()) == ("BYTES", [2])
    assert bytes_values(inputs["image"]) == REQUEST.media["image"]
    assert json.loads(bytes_values(inputs["sampling_parameters"])[0]) == {
        "max_tokens": 4,
        "stop": ["x"],
    }
    for name in (
        "stream",
        "exclude_input_in_output",
        "return_finish_reason",
        "return_num_input_tokens",
        "return_num_output_tokens",
    ):
        assert (inputs[name].datatype(), inputs[name].shape()) == ("BOOL", [1])
        assert inputs[name]._get_content() == b"\x01"


def test_a_task_and_a_raw_prompt_travel_in_their_inputs():
    ids = dataclasses.replace(
        REQUEST, messages_json=None, media={}, input_ids=(5, 2**40), task=Task.DETOKENIZE
    )
    inputs = tensors(ids)
    assert "messages" not in inputs and "text_input" not in inputs
    assert (inputs["input_ids"].datatype(), inputs["input_ids"].shape()) == ("INT64", [2])
    assert np.frombuffer(inputs["input_ids"]._get_content(), "<i8").tolist() == [5, 2**40]
    assert bytes_values(inputs["task"]) == [b"detokenize"]
    text = dataclasses.replace(
        REQUEST,
        messages_json=None,
        media={},
        text_input="Once",
        options=PromptOptions(False, False, echo=True, return_token_strs=True),
    )
    inputs = tensors(text)
    assert bytes_values(inputs["text_input"]) == [b"Once"] and "task" not in inputs
    for name, value in (
        ("add_generation_prompt", b"\x00"),
        ("add_special_tokens", b"\x00"),
        ("return_token_strs", b"\x01"),
        ("exclude_input_in_output", b"\x00"),  # echo
    ):
        assert inputs[name]._get_content() == value, name


def test_the_batch_class_travels_in_the_priority_input():
    inputs = tensors(dataclasses.replace(REQUEST, priority=Priority.BATCH))
    assert (inputs["priority"].datatype(), inputs["priority"].shape()) == ("BYTES", [1])
    assert bytes_values(inputs["priority"]) == [b"batch"]


def test_timings_are_asked_for_only_when_wanted():
    inputs = tensors(dataclasses.replace(REQUEST, return_timings=True))
    assert (inputs["return_timings"].datatype(), inputs["return_timings"].shape()) == ("BOOL", [1])
    assert inputs["return_timings"]._get_content() == b"\x01"


def test_an_adapter_and_its_path_travel_only_when_set():
    assert "lora" not in tensors(REQUEST) and "lora_path" not in tensors(REQUEST)
    load = dataclasses.replace(
        REQUEST, messages_json=None, task=Task.LOAD_LORA, lora="sql", lora_path="loras/sql"
    )
    inputs = tensors(load)
    assert (inputs["lora"].datatype(), inputs["lora"].shape()) == ("BYTES", [1])
    assert bytes_values(inputs["lora"]) == [b"sql"]
    assert bytes_values(inputs["lora_path"]) == [b"loras/sql"]
    assert bytes_values(inputs["task"]) == [b"load_lora"]


def test_no_image_input_without_images_and_stream_false():
    request = TritonRequest(
        model="m", messages_json="[]", media={}, sampling_parameters={}, stream=False
    )
    inputs = tensors(request)
    assert "image" not in inputs
    assert inputs["stream"]._get_content() == b"\x00"
    assert bytes_values(inputs["sampling_parameters"]) == [b"{}"]


# ---- reading responses ---------------------------------------------------------------------


def make_result(
    text=None,
    finish="",
    prompt=12,
    output=1,
    final=None,
    image_tokens=None,
    logprobs=None,
    stop_reason=None,
    media_cache_hits=None,
) -> InferResult:
    response = service_pb2.ModelInferResponse(model_name="qwen2_5_vl", id="r")
    if text is not None:
        _add_output(
            response,
            "text_output",
            "BYTES",
            serialize_byte_tensor(np.array([text.encode()], dtype=np.object_)).item(),
        )
        _add_output(
            response,
            "finish_reason",
            "BYTES",
            serialize_byte_tensor(np.array([finish.encode()], dtype=np.object_)).item(),
        )
        _add_output(
            response, "num_input_tokens", "UINT32", np.array([prompt], dtype=np.uint32).tobytes()
        )
        _add_output(
            response, "num_output_tokens", "UINT32", np.array([output], dtype=np.uint32).tobytes()
        )
        if image_tokens is not None:
            raw = np.array([image_tokens], dtype=np.uint32).tobytes()
            _add_output(response, "num_image_tokens", "UINT32", raw)
        if logprobs is not None:
            raw = serialize_byte_tensor(np.array([logprobs.encode()], dtype=np.object_)).item()
            _add_output(response, "logprobs", "BYTES", raw)
        if stop_reason is not None:
            raw = serialize_byte_tensor(np.array([stop_reason.encode()], dtype=np.object_)).item()
            _add_output(response, "stop_reason", "BYTES", raw)
        if media_cache_hits is not None:
            raw = np.array([media_cache_hits], dtype=np.uint32).tobytes()
            _add_output(response, "media_cache_hits", "UINT32", raw)
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return InferResult(response)


def _add_output(response, name, datatype, raw):
    tensor = response.outputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend([1])
    response.raw_output_contents.append(raw)


def test_parse_response_reads_text_finish_and_counts():
    chunk = parse_response(make_result("你好", "length", prompt=30, output=2))
    assert chunk == GenerationChunk(
        text="你好", finish_reason="length", prompt_tokens=30, completion_tokens=2
    )


def test_parse_response_without_new_outputs_has_none():
    chunk = parse_response(make_result("a"))
    assert (chunk.image_tokens, chunk.logprobs) == (None, None)


def test_parse_response_reads_the_stop_string_that_ended_the_choice():
    assert parse_response(make_result("a", "stop", stop_reason="。\n")).stop_reason == "。\n"
    assert parse_response(make_result("a", "stop")).stop_reason is None


def test_parse_response_reads_timings_prompt_logprobs_and_the_repetition_flag():
    result = make_result("a", "stop")
    response = result.get_response()
    timings = {"queue": 0.5, "ttft": 1.25, "decode": -1, "unknown": 3, "vision": "x"}
    prompt = [None, {"7": {"logprob": -1.5, "rank": 2, "decoded_token": "a"}}]
    for name, value in (("timings", timings), ("prompt_logprobs", prompt)):
        raw = json.dumps(value).encode()
        _add_output(
            response, name, "BYTES", serialize_byte_tensor(np.array([raw], np.object_)).item()
        )
    _add_output(response, "repetition_detected", "BOOL", b"\x01")
    chunk = parse_response(result)
    # only known stages with a finite, non-negative number of seconds
    assert chunk.timings == {"queue": 0.5, "ttft": 1.25}
    assert chunk.prompt_logprobs == prompt
    assert chunk.repetition_detected is True
    plain = parse_response(make_result("a"))
    assert (plain.timings, plain.prompt_logprobs, plain.repetition_detected) == (None, None, False)


def test_parse_response_reads_the_media_cache_hits():
    assert parse_response(make_result("a", "stop", media_cache_hits=2)).media_cache_hits == 2
    assert parse_response(make_result("a")).media_cache_hits is None


def test_parse_response_reads_image_tokens():
    assert parse_response(make_result("a", image_tokens=256)).image_tokens == 256


def test_parse_response_reads_logprobs_in_openai_shape():
    entries = [
        {
            "token": "你",
            "logprob": -0.25,
            "bytes": [228, 189, 160],
            "top_logprobs": [
                {"token": "你", "logprob": -0.25, "bytes": [228, 189, 160]},
                {"token": "a", "logprob": -2, "bytes": [97], "extra": 1},
            ],
        },
        {"token": "b", "logprob": -1, "top_logprobs": []},  # bytes omitted: from the token
    ]
    chunk = parse_response(make_result("你b", logprobs=json.dumps(entries, ensure_ascii=False)))
    assert chunk.logprobs == [
        {
            "token": "你",
            "logprob": -0.25,
            "bytes": [228, 189, 160],
            "top_logprobs": [
                {"token": "你", "logprob": -0.25, "bytes": [228, 189, 160]},
                {"token": "a", "logprob": -2.0, "bytes": [97]},
            ],
        },
        {"token": "b", "logprob": -1.0, "bytes": [98], "top_logprobs": []},
    ]


def test_unreadable_logprobs_are_logged_not_fatal(caplog):
    with caplog.at_level(logging.ERROR, logger="proxy.backend"):
        chunk = parse_response(make_result("a", logprobs="{not json"))
    assert chunk.text == "a" and chunk.logprobs == []
    assert "logprobs" in caplog.text


def test_parse_response_empty_finish_reason_is_none():
    assert parse_response(make_result("a", "")).finish_reason is None


def test_empty_final_response_has_no_chunk():
    assert parse_response(make_result(final=True)) is None


def test_final_flag_decides_the_end():
    assert is_final_response(make_result(final=True), None)
    assert not is_final_response(
        make_result("a", "stop", final=False), GenerationChunk("a", "stop")
    )


def test_without_final_flag_finish_reason_ends_the_stream():
    result = make_result("a", "stop")
    assert is_final_response(result, parse_response(result))
    result = make_result("a", "")
    assert not is_final_response(result, parse_response(result))


def model_says(kind, message, param=None, code=None) -> InferenceServerException:
    return InferenceServerException(ModelError(kind, message, param, code).encode())


@pytest.mark.parametrize(
    "param, code",
    [("max_tokens", "context_length_exceeded"), (None, None)],
)
def test_the_models_request_errors_fill_the_400_envelope(param, code):
    error = model_error(model_says("invalid_request", "prompt is 9000 tokens", param, code), "r1")
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert (error.message, error.param, error.code) == ("prompt is 9000 tokens", param, code)


@pytest.mark.parametrize(
    "kind, code", [("busy", "server_busy"), ("unavailable", "model_unavailable")]
)
def test_busy_and_unavailable_models_are_503(kind, code):
    error = model_error(model_says(kind, "64 requests are already waiting"), "r1")
    assert (error.status, error.code) == (503, code)


def test_old_prose_errors_are_no_longer_trusted_as_client_errors():
    """Only the contract's data is shown to clients; prose from elsewhere is a generic 500."""
    error = model_error(InferenceServerException("invalid_request: image 3 is not decodable"), "r1")
    assert error.status == 500 and "image 3" not in error.message


def test_other_model_errors_are_generic_500_and_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="proxy.backend"):
        error = model_error(
            InferenceServerException("Traceback ... /models/qwen/model.py OOM"), "r1"
        )
    assert (error.status, error.type) == (500, "server_error")
    assert "OOM" not in error.message and "r1" in error.message
    assert "OOM" in caplog.text


# ---- the stream lifecycle ------------------------------------------------------------------


class ScriptedStream:
    """Stands in for tritonclient's stream iterator: consumes the request, plays a script."""

    def __init__(self, client: FakeClient, requests) -> None:
        self.client = client
        self.requests = requests
        self.script = list(client.script)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.client.sent:
            self.client.sent.append(await anext(self.requests))
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException) and not isinstance(item, InferenceServerException):
            raise item
        if isinstance(item, InferenceServerException):
            return None, item
        return item, None

    def cancel(self):
        self.client.cancelled = True
        return True


class FakeClient:
    script: list = []

    def __init__(self, url, **kwargs):
        self.url = url
        self.sent: list[dict] = []
        self.streams: list[ScriptedStream] = []
        self.cancelled = False
        self.closed = False
        self.ready = True
        self.ready_calls: list[tuple] = []
        self.index: dict | Exception = {"models": []}
        self.index_calls: list[tuple] = []
        self.load_calls: list[str] = []
        self.load_error: Exception | None = None
        self.headers: list[dict | None] = []  # each stream's gRPC metadata

    def stream_infer(self, inputs_iterator, stream_timeout=None, headers=None):
        self.headers.append(headers)
        stream = ScriptedStream(self, inputs_iterator)
        self.streams.append(stream)
        return stream

    async def is_model_ready(self, model_name, client_timeout=None):
        self.ready_calls.append((model_name, client_timeout))
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready

    async def get_model_repository_index(self, as_json=False, client_timeout=None):
        self.index_calls.append((as_json, client_timeout))
        if isinstance(self.index, Exception):
            raise self.index
        return self.index

    async def load_model(self, model_name, **kwargs):
        self.load_calls.append(model_name)
        if self.load_error is not None:
            raise self.load_error

    async def close(self):
        self.closed = True


@pytest.fixture
def make_backend(monkeypatch):
    def make(*script) -> tuple[TritonBackend, FakeClient]:
        monkeypatch.setattr(FakeClient, "script", list(script))
        monkeypatch.setattr(backend_module.grpcclient_aio, "InferenceServerClient", FakeClient)
        backend = TritonBackend("triton:8001", ready_timeout_s=1.5)
        return backend, backend._client

    return make


async def collect(backend, request=REQUEST, request_id="req-7"):
    return [chunk async for chunk in backend.generate(request, request_id)]


async def test_streams_until_empty_final_and_ends_request_side(make_backend):
    backend, client = make_backend(
        make_result("a", final=False),
        make_result("b", "stop", final=False),
        make_result(final=True),
    )

    chunks = await collect(backend)

    assert [c.text for c in chunks] == ["a", "b"]
    assert chunks[-1].finish_reason == "stop"
    (sent,) = client.sent
    assert sent["model_name"] == "qwen2_5_vl"
    assert sent["request_id"] == "req-7"
    assert sent["parameters"] == {"triton_enable_empty_final_response": True}
    assert {t.name() for t in sent["inputs"]} >= {"messages", "image", "stream"}
    assert not client.cancelled
    with pytest.raises(StopAsyncIteration):  # the request side was let go: the stream half-closes
        await anext(client.streams[0].requests)


async def test_final_flag_on_a_text_response_ends_the_stream(make_backend):
    backend, client = make_backend(
        make_result("a", final=False), make_result("b", "stop", final=True)
    )
    assert [c.text for c in await collect(backend)] == ["a", "b"]
    assert not client.cancelled


async def test_request_side_stays_open_until_final(make_backend):
    backend, client = make_backend(make_result("a", final=False), make_result(final=True))
    chunks = backend.generate(REQUEST, "r")
    await anext(chunks)

    next_request = asyncio.ensure_future(anext(client.streams[0].requests))
    await asyncio.sleep(0.05)
    # Ending the request iterator now would half-close the stream before the final response.
    assert not next_request.done()

    assert [chunk async for chunk in chunks] == []
    with pytest.raises(StopAsyncIteration):
        await next_request


async def test_closing_early_cancels_the_stream(make_backend):
    backend, client = make_backend(
        make_result("a", final=False), make_result("b", final=False), make_result(final=True)
    )
    chunks = backend.generate(REQUEST, "r")
    assert (await anext(chunks)).text == "a"
    await chunks.aclose()
    assert client.cancelled


async def test_model_error_raises_and_cancels(make_backend):
    backend, client = make_backend(
        make_result("a", final=False), model_says("invalid_request", "too long")
    )
    with pytest.raises(APIError) as caught:
        await collect(backend)
    assert (caught.value.status, caught.value.message) == (400, "too long")
    assert client.cancelled


async def test_grpc_failure_is_503_backend_unavailable(make_backend):
    failure = grpc.aio.AioRpcError(
        code=grpc.StatusCode.UNAVAILABLE,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(),
        details="failed to connect to all addresses; 10.9.8.7:8001",
    )
    backend, _client = make_backend(failure)
    with pytest.raises(APIError) as caught:
        await collect(backend)
    assert (caught.value.status, caught.value.type, caught.value.code) == (
        503,
        "service_unavailable",
        "backend_unavailable",
    )
    assert "10.9.8.7" not in caught.value.message


async def test_stream_closed_without_final_is_500(make_backend):
    backend, _client = make_backend(make_result("a", final=False))
    with pytest.raises(APIError) as caught:
        await collect(backend)
    assert caught.value.status == 500


async def test_is_ready_uses_model_and_timeout(make_backend):
    backend, client = make_backend()
    assert await backend.is_ready("qwen2_5_vl") is True
    assert client.ready_calls == [("qwen2_5_vl", 1.5)]
    client.ready = False
    assert await backend.is_ready("qwen2_5_vl") is False
    client.ready = InferenceServerException("unavailable")
    assert await backend.is_ready("qwen2_5_vl") is False


async def test_generate_sends_the_request_model(make_backend):
    backend, client = make_backend(make_result("a", "stop", final=True))
    request = TritonRequest(
        model="other_model", messages_json="[]", media={}, sampling_parameters={}, stream=False
    )
    await collect(backend, request)
    assert client.sent[0]["model_name"] == "other_model"


async def test_repository_index_maps_names_to_states(make_backend):
    backend, client = make_backend()
    client.index = {
        "models": [
            {"name": "qwen2_5_vl", "version": "1", "state": "READY"},
            {"name": "lazy_one"},  # explicit model control: in the repository, never loaded
        ]
    }
    assert await backend.repository_index() == {"qwen2_5_vl": "READY", "lazy_one": ""}
    assert client.index_calls == [(True, 1.5)]
    client.index = InferenceServerException("unavailable")
    with pytest.raises(InferenceServerException):
        await backend.repository_index()


async def test_load_model_failure_is_503_without_details(make_backend, caplog):
    backend, client = make_backend()
    await backend.load_model("qwen2_5_vl")
    assert client.load_calls == ["qwen2_5_vl"]
    client.load_error = InferenceServerException("failed to load: CUDA OOM at /opt/x.py")
    with caplog.at_level(logging.ERROR, logger="proxy.backend"):
        with pytest.raises(APIError) as caught:
            await backend.load_model("qwen2_5_vl")
    assert (caught.value.status, caught.value.code) == (503, "model_load_failed")
    assert "OOM" not in caught.value.message and "OOM" in caplog.text


async def test_close_closes_the_client(make_backend):
    backend, client = make_backend()
    await backend.close()
    assert client.closed
