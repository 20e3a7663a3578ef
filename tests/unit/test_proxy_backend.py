"""TritonBackend without a server: the tensors it sends, how it reads responses, and the
stream lifecycle (final detection, cancellation, error mapping) against a scripted client."""

from __future__ import annotations

import asyncio
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

from proxy import backend as backend_module
from proxy.backend import (
    GenerationChunk,
    TritonBackend,
    build_inputs,
    is_final_response,
    model_error,
    parse_response,
)
from proxy.errors import APIError
from proxy.translate import TritonRequest

REQUEST = TritonRequest(
    messages_json=json.dumps(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "猫?"}]}],
        ensure_ascii=False,
    ),
    images=[b"\x89PNG\r\n\x1a\nA", b"\xff\xd8\xffB\x00"],
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

    assert set(inputs) == {
        "messages",
        "image",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
        "return_finish_reason",
        "return_num_input_tokens",
        "return_num_output_tokens",
    }
    assert (inputs["messages"].datatype(), inputs["messages"].shape()) == ("BYTES", [1])
    assert bytes_values(inputs["messages"]) == [REQUEST.messages_json.encode("utf-8")]
    assert (inputs["image"].datatype(), inputs["image"].shape()) == ("BYTES", [2])
    assert bytes_values(inputs["image"]) == REQUEST.images
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


def test_no_image_input_without_images_and_stream_false():
    request = TritonRequest(messages_json="[]", images=[], sampling_parameters={}, stream=False)
    inputs = tensors(request)
    assert "image" not in inputs
    assert inputs["stream"]._get_content() == b"\x00"
    assert bytes_values(inputs["sampling_parameters"]) == [b"{}"]


# ---- reading responses ---------------------------------------------------------------------


def make_result(text=None, finish="", prompt=12, output=1, final=None) -> InferResult:
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


def test_invalid_request_prefix_maps_to_400_with_the_rest():
    error = model_error(InferenceServerException("invalid_request: image 3 is not decodable"), "r1")
    assert (error.status, error.type, error.message) == (
        400,
        "invalid_request_error",
        "image 3 is not decodable",
    )


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

    def stream_infer(self, inputs_iterator):
        stream = ScriptedStream(self, inputs_iterator)
        self.streams.append(stream)
        return stream

    async def is_model_ready(self, model_name, client_timeout=None):
        self.ready_calls.append((model_name, client_timeout))
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready

    async def close(self):
        self.closed = True


@pytest.fixture
def make_backend(monkeypatch):
    def make(*script) -> tuple[TritonBackend, FakeClient]:
        monkeypatch.setattr(FakeClient, "script", list(script))
        monkeypatch.setattr(backend_module.grpcclient_aio, "InferenceServerClient", FakeClient)
        backend = TritonBackend("triton:8001", "qwen2_5_vl", ready_timeout_s=1.5)
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
        make_result("a", final=False), InferenceServerException("invalid_request: too long")
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
    assert await backend.is_ready() is True
    assert client.ready_calls == [("qwen2_5_vl", 1.5)]
    client.ready = False
    assert await backend.is_ready() is False
    client.ready = InferenceServerException("unavailable")
    assert await backend.is_ready() is False


async def test_close_closes_the_client(make_backend):
    backend, client = make_backend()
    await backend.close()
    assert client.closed
