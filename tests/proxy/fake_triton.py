"""A fake Triton: Triton's gRPC service, in Python, speaking the Qwen model's tensor contract.

It starts in milliseconds and can be stopped and restarted on the same port, so tests can
kill "Triton" mid-stream and watch the proxy's real gRPC client recover. The model is
scripted by the last user message, `key=value` words:

    tokens=N     stream N text responses "t0 ", "t1 ", ... (default 3), then the final flag
    delay=S      sleep S seconds before each text response
    error=TEXT   answer with an error response whose message is TEXT (`_` for spaces)
    model_error=KIND  answer with the model's error of that kind (proxy/transport/contract.py)

A `describe` request gets `FakeTritonState.limits` (the contract's defaults unless changed).
It counts streams started, completed and cancelled (the client went away), records each
stream's client address (one per proxy process: each has its own channel), its request's
string parameters and its gRPC metadata (where a trace context travels), and answers
ModelReady / RepositoryIndex for one model, ready unless `ready` is False.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.transport.contract import DESCRIBE_INPUT, ModelError, ModelLimits

MODEL = "qwen2_5_vl"


@dataclass
class FakeTritonState:
    ready: bool = True
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    requests: list[str] = field(default_factory=list)  # the last user text of each stream
    peers: list[str] = field(default_factory=list)  # the gRPC client address of each stream
    parameters: list[dict[str, str]] = field(default_factory=list)  # string ones, per stream
    metadata: list[dict[str, str]] = field(default_factory=list)  # gRPC metadata, per stream
    limits: ModelLimits = field(default_factory=ModelLimits)
    describes: int = 0


def _bytes_tensor(
    name: str, values: list[bytes]
) -> tuple[service_pb2.ModelInferResponse.InferOutputTensor, bytes]:
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    tensor = service_pb2.ModelInferResponse.InferOutputTensor(
        name=name, datatype="BYTES", shape=[len(values)]
    )
    return tensor, raw


def _uint32_tensor(name: str, value: int):
    tensor = service_pb2.ModelInferResponse.InferOutputTensor(
        name=name, datatype="UINT32", shape=[1]
    )
    return tensor, np.array([value], dtype="<u4").tobytes()


def _response(
    request_id: str, outputs=(), final: bool = False
) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelInferResponse(model_name=MODEL, id=request_id)
    for tensor, raw in outputs:
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    response.parameters["triton_final_response"].bool_param = final
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def _last_user_text(request: service_pb2.ModelInferRequest) -> str:
    for index, tensor in enumerate(request.inputs):
        if tensor.name == "messages":
            raw = request.raw_input_contents[index]
            (length,) = struct.unpack("<I", raw[:4])
            messages = json.loads(raw[4 : 4 + length])
            content = messages[-1]["content"]
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content)
            return content
    return ""


class FakeTritonServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: FakeTritonState) -> None:
        self.state = state

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self.state.ready and request.name == MODEL)

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def RepositoryIndex(self, request, context):
        state = "READY" if self.state.ready else "UNAVAILABLE"
        return service_pb2.RepositoryIndexResponse(
            models=[service_pb2.RepositoryIndexResponse.ModelIndex(name=MODEL, state=state)]
        )

    async def ModelStreamInfer(self, request_iterator, context):
        request = await anext(aiter(request_iterator))
        if any(tensor.name == DESCRIBE_INPUT for tensor in request.inputs):
            self.state.describes += 1
            limits = self.state.limits.encode().encode()
            yield _response(request.id, [_bytes_tensor("text_output", [limits])], final=True)
            return
        text = _last_user_text(request)
        self.state.started += 1
        self.state.requests.append(text)
        self.state.peers.append(context.peer())
        self.state.parameters.append(
            {
                name: value.string_param
                for name, value in request.parameters.items()
                if value.WhichOneof("parameter_choice") == "string_param"
            }
        )
        self.state.metadata.append(dict(context.invocation_metadata() or ()))
        script = dict(word.split("=", 1) for word in text.split() if "=" in word)
        try:
            if "error" in script or "model_error" in script:
                message = (
                    ModelError(script["model_error"], "the model says no").encode()
                    if "model_error" in script
                    else script["error"].replace("_", " ")
                )
                yield service_pb2.ModelStreamInferResponse(error_message=message)
                return
            count = int(script.get("tokens", 3))
            delay = float(script.get("delay", 0))
            for index in range(count):
                if delay:
                    await asyncio.sleep(delay)
                finish = b"stop" if index == count - 1 else b""
                yield _response(
                    request.id,
                    [
                        _bytes_tensor("text_output", [f"t{index} ".encode()]),
                        _bytes_tensor("finish_reason", [finish]),
                        _uint32_tensor("num_input_tokens", 3),
                        _uint32_tensor("num_output_tokens", 1),
                    ],
                )
            yield _response(request.id, final=True)
            self.state.completed += 1
        except asyncio.CancelledError:
            self.state.cancelled += 1
            raise


class FakeTriton:
    """`await start()` / `await stop()` (abruptly, like a killed process), same port each time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.state = FakeTritonState()
        self._server: grpc.aio.Server | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            FakeTritonServicer(self.state), server
        )
        server.add_insecure_port(self.url)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)  # cancels running streams at once
            self._server = None
