"""The inference backend: one Triton gRPC stream per chat completion.

Both streaming and non-streaming completions go through `generate`; a non-streaming request
just asks the model for a single response carrying the whole text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from opentelemetry.trace import SpanKind
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from ..error_catalogue import (
    BACKEND_UNAVAILABLE,
    INTERNAL_ERROR,
    MODEL_ERRORS,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    MODEL_REQUEST_ERROR,
    MODEL_UNAVAILABLE,
    SERVER_BUSY,
    APIError,
    triton_error,
)
from ..observability.tracing import REQUEST_ID, end_child, start_child, trace_headers
from .contract import (
    DEFAULT_PRIORITY,
    DESCRIBE_INPUT,
    Input,
    ModelError,
    ModelLimits,
    Output,
    Priority,
    Task,
    decode_error,
    decode_timings,
)
from .liveness import LivenessWatch, Verdicts

log = logging.getLogger("proxy.backend")

# gRPC backs off between reconnection attempts up to 120 s by default, so a proxy would
# take up to two minutes to notice a restarted tritonserver; a few seconds is plenty.
_MAX_RECONNECT_BACKOFF_MS = 2000

# The model answers `describe` in its execute loop, which a busy CPU engine can hold up.
_DESCRIBE_TIMEOUT_S = 10.0
# Asking whether the model lives (liveness.py, readiness): a dead model's answer takes
# Triton's stub health check (one second); a slower answer is a busy model, no verdict. With
# the readiness check's own timeout it stays within the 4 s the proxy's probes allow.
_PROBE_TIMEOUT_S = 2.0
# How long readiness trusts the model's last "alive": an idle model's death shows on /ready
# within this (streams find it within seconds, and readiness sees their verdict at once).
_READY_FRESH_S = 5.0

# Without this Triton drops the model's empty FINAL-flag response, and the proxy could not
# tell "done" from "more to come" when the last text response was not flagged final.
_STREAM_PARAMETERS = {"triton_enable_empty_final_response": True}


@dataclass(frozen=True)
class PromptOptions:
    """How the model renders the prompt and what it returns of it (the inputs of these names);
    the defaults are the model's own, and only what differs from them is sent."""

    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # None: the model's default for the prompt's kind
    echo: bool = False  # the prompt in front of the output (exclude_input_in_output false)
    return_token_strs: bool = False  # tokenize: each token's string too


DEFAULT_PROMPT_OPTIONS = PromptOptions()


@dataclass(frozen=True)
class TritonRequest:
    """What the proxy sends to the Triton model, before it becomes tensors."""

    model: str
    messages_json: str | None  # None: the prompt is `text_input` or `input_ids`
    media: dict[str, list[bytes]]  # Triton input (e.g. "image") -> encoded elements, in order
    sampling_parameters: dict[str, Any]
    stream: bool
    tools_json: str | None = None  # the `tools` input: tools rendered into the prompt
    priority: Priority = DEFAULT_PRIORITY  # the `priority` input: the scheduling class
    # A prompt the model takes as it is (no chat template): text, or token ids.
    text_input: str | None = None
    input_ids: tuple[int, ...] | None = None
    options: PromptOptions = DEFAULT_PROMPT_OPTIONS
    task: Task = Task.GENERATE  # the `task` input: tokenize and detokenize generate nothing
    return_timings: bool = False  # the `return_timings` input: the stages, on the last response
    # The `lora` input: the adapter the request runs with, by its served name (None: the base
    # weights); for the load_lora / unload_lora tasks, the adapter the task is about.
    lora: str | None = None
    lora_path: str | None = None  # the `lora_path` input: load_lora's adapter directory


@dataclass(frozen=True)
class GenerationChunk:
    """One model response: new text and the tokens it covers."""

    text: str
    finish_reason: str | None = None  # None until the last chunk
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    image_tokens: int | None = None  # image placeholder tokens in the prompt, when reported
    video_tokens: int | None = None  # video placeholder tokens in the prompt, when reported
    # One OpenAI logprobs entry per token this response covers; None unless requested.
    logprobs: list[dict[str, Any]] | None = None
    index: int = 0  # the choice this chunk belongs to (n > 1)
    # The request's stages in seconds (contract.TIMING_STAGES), on its last response when asked.
    timings: dict[str, float] | None = None
    # vLLM's prompt_logprobs (a list, None first), on the request's first response when asked.
    prompt_logprobs: list[Any] | None = None
    repetition_detected: bool = False  # the repetition guard ended this choice
    stop_reason: str | None = None  # the stop string that ended the choice, on its last chunk
    # Of the request's images and videos, how many the model's embedding cache answered; on
    # the request's last response, from models that report it.
    media_cache_hits: int | None = None


class Backend(Protocol):
    def generate(
        self, request: TritonRequest, request_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Chunks of one completion; closing the generator early cancels the generation.

        Raises APIError: 400 for requests the model rejects, 500 for model failures, 503 when
        the backend cannot be reached.
        """
        ...

    async def is_ready(self, model: str) -> bool:
        """Whether Triton has `model` loaded and ready; False when it cannot be asked."""
        ...

    async def repository_index(self) -> dict[str, str]:
        """Triton's model repository: model name -> state (READY, UNAVAILABLE, "" if never
        loaded, ...). Raises when Triton cannot be asked."""
        ...

    async def load_model(self, model: str) -> None:
        """Loads `model` (Triton's explicit model control); raises APIError 503 on failure."""
        ...

    async def describe(self, model: str) -> ModelLimits | None:
        """The limits `model` holds requests to (its `describe` answer); None when the model
        does not answer it. Raises APIError 503 when Triton or the model cannot be asked."""
        ...

    async def close(self) -> None: ...


# Older names of two catalogue entries, which tests still import.
backend_unavailable = BACKEND_UNAVAILABLE
model_load_failed = MODEL_LOAD_FAILED


class TritonBackend:
    """`Backend` over `tritonclient.grpc.aio`; create it inside the serving event loop."""

    def __init__(self, url: str, *, ready_timeout_s: float = 2.0) -> None:
        self._client = grpcclient_aio.InferenceServerClient(url, channel_args=channel_args())
        self._ready_timeout_s = ready_timeout_s
        self._verdicts = Verdicts(self._ask_whether_alive)
        self._liveness = LivenessWatch(self.lives)

    async def generate(
        self, request: TritonRequest, request_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        finished = asyncio.Event()
        span = start_child("triton.infer", SpanKind.CLIENT)
        if span is not None:
            span.set_attributes(_infer_attributes(request, request_id))
        # The model's spans take the parent from the request parameter; Triton's own (its
        # OpenTelemetry trace mode) from the gRPC metadata.
        trace = trace_headers(span)
        outgoing = self._requests(request.model, build_inputs(request), request_id, finished, trace)
        responses = self._client.stream_infer(outgoing, headers=trace or None)
        completed = False
        failure: BaseException | None = None
        watched = None
        try:
            with self._liveness.watching(request.model, responses.cancel) as watched:
                async for result, error in responses:
                    watched.heard()
                    if error is not None:
                        raise self._failure(request.model, error, request_id)
                    chunk = parse_response(result)
                    completed = is_final_response(result, chunk)
                    if chunk is not None:
                        yield chunk
                    if completed:
                        return
            log.error("request %s: Triton closed the stream before the final response", request_id)
            failure = INTERNAL_ERROR(request_id=request_id)
            raise failure
        except grpc.RpcError as exc:
            log.warning("request %s: Triton unreachable: %s", request_id, _rpc_summary(exc))
            failure = BACKEND_UNAVAILABLE()
            raise failure from None
        except APIError as exc:
            failure = exc
            raise
        except asyncio.CancelledError:
            # The liveness watchdog cancelled the call (its model process died), not the
            # request's task: the client gets a 503 it may retry.
            if watched is not None and watched.dead and not _task_cancelling():
                failure = BACKEND_UNAVAILABLE()
                raise failure from None
            raise
        finally:
            # Ends the request iterator, so a completed stream half-closes normally; anything
            # else (client gone, error) cancels it and Triton tells the model to stop.
            finished.set()
            if not completed:
                responses.cancel()
            end_child(span, failure)

    def _failure(self, model: str, error: InferenceServerException, request_id: str) -> APIError:
        """`model_error`; one that says the model's process is gone is also a verdict."""
        failure = model_error(error, request_id)
        if failure.code == BACKEND_UNAVAILABLE.code:
            self._verdicts.record(model, alive=False)
        return failure

    async def _requests(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        request_id: str,
        finished: asyncio.Event,
        trace: dict[str, str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": model,
            "inputs": inputs,
            "request_id": request_id,
            "parameters": {**_STREAM_PARAMETERS, **trace} if trace else _STREAM_PARAMETERS,
        }
        # Closing the request side early would end the stream before all responses arrive.
        await finished.wait()

    async def is_ready(self, model: str) -> bool:
        """Triton has the model loaded and its process lives: Triton's own readiness stays
        true after the model's stub died."""
        try:
            loaded = await self._client.is_model_ready(model, client_timeout=self._ready_timeout_s)
        except Exception as exc:  # readiness is a yes/no question; the reason goes to the log
            log.debug("readiness check failed: %s", exc)
            return False
        return bool(loaded) and await self._verdicts.lives(model, _READY_FRESH_S)

    async def lives(self, model: str) -> bool:
        """Whether the model's process lives, as its last answer said (`Verdicts`)."""
        return await self._verdicts.lives(model)

    async def _ask_whether_alive(self, model: str) -> bool | None:
        """False when the model answers a `describe` request with Triton's word that its
        process is gone (`BACKEND_UNAVAILABLE` in `TRITON_ERRORS`), or Triton cannot be
        reached; True for any other answer; None (no verdict) for a slow one."""
        try:
            _, error = await self._ask_describe(model, _PROBE_TIMEOUT_S)
        except TimeoutError:
            return None
        except grpc.RpcError as exc:
            log.warning("model %s cannot be asked: %s", model, _rpc_summary(exc))
            return False
        if error is not None and triton_error(error.message() or "") is BACKEND_UNAVAILABLE:
            log.warning("model %s does not live: %s", model, error.message())
            return False
        return True

    async def repository_index(self) -> dict[str, str]:
        index = await self._client.get_model_repository_index(
            as_json=True, client_timeout=self._ready_timeout_s
        )
        return {entry["name"]: entry.get("state", "") for entry in index.get("models", [])}

    async def load_model(self, model: str) -> None:
        # No client timeout: loading weights takes as long as it takes; callers bound waiting.
        try:
            await self._client.load_model(model)
        except InferenceServerException as exc:
            log.error("loading model %r failed: %s", model, exc.message())
            raise MODEL_LOAD_FAILED() from None

    async def describe(self, model: str) -> ModelLimits | None:
        try:
            result, error = await self._ask_describe(model, _DESCRIBE_TIMEOUT_S)
        except (grpc.RpcError, TimeoutError):
            raise BACKEND_UNAVAILABLE() from None
        if error is not None:
            message = error.message() or ""
            entry = triton_error(message) if decode_error(message) is None else None
            if entry is not None:
                raise entry()
            # an older model that has no `describe` input, or a model error
            log.warning("model %r did not describe its limits: %s", model, error)
            return None
        text = None if result is None else result.as_numpy(Output.TEXT_OUTPUT)
        return ModelLimits.decode(_first_text(text)) if _has_items(text) else None

    async def _ask_describe(
        self, model: str, timeout_s: float
    ) -> tuple[grpcclient.InferResult | None, InferenceServerException | None]:
        """The model's first answer to a `describe` request, (None, None) when it sent none;
        raises grpc.RpcError or TimeoutError."""
        finished = asyncio.Event()
        inputs = [_bool_input(DESCRIBE_INPUT, True)]
        responses = self._client.stream_infer(
            self._requests(model, inputs, f"describe-{model}", finished)
        )
        try:
            async with asyncio.timeout(timeout_s):
                async for result, error in responses:
                    return result, error
        finally:
            finished.set()
            responses.cancel()
        return None, None

    async def close(self) -> None:
        await self._liveness.close()
        self._verdicts.close()
        await self._client.close()


def _infer_attributes(request: TritonRequest, request_id: str) -> dict[str, Any]:
    return {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelStreamInfer",
        "triton.model": request.model,
        REQUEST_ID: request_id,
    }


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel options, plus a short reconnection backoff."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 1000),  # gRPC's default
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]


def build_inputs(request: TritonRequest) -> list[grpcclient.InferInput]:
    options = request.options
    inputs = []
    if request.messages_json is not None:
        inputs.append(_bytes_input(Input.MESSAGES, [request.messages_json.encode("utf-8")]))
    if request.text_input is not None:
        inputs.append(_bytes_input(Input.TEXT_INPUT, [request.text_input.encode("utf-8")]))
    if request.input_ids is not None:
        inputs.append(_int64_input(Input.INPUT_IDS, request.input_ids))
    inputs += [
        _bool_input(Input.STREAM, request.stream),
        _bytes_input(
            Input.SAMPLING_PARAMETERS, [json.dumps(request.sampling_parameters).encode("utf-8")]
        ),
        _bool_input(Input.EXCLUDE_INPUT_IN_OUTPUT, not options.echo),
        _bool_input(Input.RETURN_FINISH_REASON, True),
        _bool_input(Input.RETURN_NUM_INPUT_TOKENS, True),
        _bool_input(Input.RETURN_NUM_OUTPUT_TOKENS, True),
    ]
    # Inputs newer than the model's first contract go only when they say something other than
    # the model's default, so plain chat requests also reach models without them.
    if request.task is not Task.GENERATE:
        inputs.append(_bytes_input(Input.TASK, [request.task.value.encode("utf-8")]))
    if not options.add_generation_prompt:
        inputs.append(_bool_input(Input.ADD_GENERATION_PROMPT, False))
    if options.add_special_tokens is not None:
        inputs.append(_bool_input(Input.ADD_SPECIAL_TOKENS, options.add_special_tokens))
    if options.return_token_strs:
        inputs.append(_bool_input(Input.RETURN_TOKEN_STRS, True))
    if request.tools_json is not None:
        inputs.append(_bytes_input(Input.TOOLS, [request.tools_json.encode("utf-8")]))
    # Only when not the default, which the model assumes without it: a model from before the
    # input existed still serves every interactive request.
    if request.priority is not DEFAULT_PRIORITY:
        inputs.append(_bytes_input(Input.PRIORITY, [request.priority.value.encode("utf-8")]))
    if request.return_timings:  # likewise: only when asked
        inputs.append(_bool_input(Input.RETURN_TIMINGS, True))
    if request.lora:  # likewise: the base model's requests reach models without adapters
        inputs.append(_bytes_input(Input.LORA, [request.lora.encode("utf-8")]))
    if request.lora_path is not None:
        inputs.append(_bytes_input(Input.LORA_PATH, [request.lora_path.encode("utf-8")]))
    for tensor, elements in request.media.items():
        if elements:  # Triton rejects a zero-element input; no media means no input
            inputs.append(_bytes_input(tensor, elements))
    return inputs


def _bytes_input(name: str, values: list[bytes]) -> grpcclient.InferInput:
    array = np.empty(len(values), dtype=np.object_)
    array[:] = values
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def _int64_input(name: str, values: tuple[int, ...]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values)], "INT64")
    tensor.set_data_from_numpy(np.array(values, dtype=np.int64))
    return tensor


def _bool_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=np.bool_))
    return tensor


def parse_response(result: grpcclient.InferResult) -> GenerationChunk | None:
    """The chunk in one response; None for the empty response that only marks the end.

    One pass over the response's outputs, decoding the raw tensors without numpy (`as_numpy`
    scans every output per name and builds an array each time: most of a chunk's cost)."""
    outputs = _outputs(result)
    text = outputs.get(Output.TEXT_OUTPUT)
    if text is None:
        return None
    finish_reason = outputs.get(Output.FINISH_REASON)
    prompt_tokens = outputs.get(Output.NUM_INPUT_TOKENS)
    completion_tokens = outputs.get(Output.NUM_OUTPUT_TOKENS)
    image_tokens = outputs.get(Output.NUM_IMAGE_TOKENS)
    video_tokens = outputs.get(Output.NUM_VIDEO_TOKENS)
    logprobs = outputs.get(Output.LOGPROBS)
    index = outputs.get(Output.INDEX)
    timings = outputs.get(Output.TIMINGS)
    prompt_logprobs = outputs.get(Output.PROMPT_LOGPROBS)
    repetition = outputs.get(Output.REPETITION_DETECTED)
    stop_reason = outputs.get(Output.STOP_REASON)
    cache_hits = outputs.get(Output.MEDIA_CACHE_HITS)
    return GenerationChunk(
        text="".join(item.decode("utf-8") for item in text),
        finish_reason=finish_reason[0].decode("utf-8") or None if finish_reason else None,
        prompt_tokens=int(prompt_tokens[0]) if prompt_tokens else None,
        completion_tokens=int(sum(completion_tokens)) if completion_tokens else 0,
        image_tokens=int(image_tokens[0]) if image_tokens else None,
        video_tokens=int(video_tokens[0]) if video_tokens else None,
        logprobs=parse_logprobs(logprobs[0].decode("utf-8")) if logprobs else None,
        index=int(index[0]) if index else 0,
        timings=decode_timings(timings[0].decode("utf-8")) if timings else None,
        prompt_logprobs=_json_list(prompt_logprobs[0]) if prompt_logprobs else None,
        repetition_detected=bool(repetition and repetition[0]),
        stop_reason=stop_reason[0].decode("utf-8") if stop_reason else None,
        media_cache_hits=int(cache_hits[0]) if cache_hits else None,
    )


def _json_list(data: bytes) -> list[Any] | None:
    """A JSON list output (prompt_logprobs) as it is; None, logged, when it is not one."""
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, list):
        log.error("unreadable list output from the model: %r", data[:200])
        return None
    return value


# Integer (and boolean) tensors the model sends, as struct formats of one little-endian element.
_INT_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
}


def _outputs(result: grpcclient.InferResult) -> dict[str, Sequence[Any]]:
    """Each output's elements (bytes for BYTES tensors, ints for integer ones), flattened."""
    response = result.get_response()
    raw = response.raw_output_contents
    decoded: dict[str, Sequence[Any]] = {}
    for position, output in enumerate(response.outputs):
        datatype = output.datatype
        if position < len(raw) and datatype == "BYTES":
            decoded[output.name] = _bytes_elements(raw[position])
        elif position < len(raw) and datatype in _INT_FORMATS:
            data = raw[position]
            fmt = _INT_FORMATS[datatype]
            decoded[output.name] = struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data)
        else:  # another layout (contents fields, other types): tritonclient's own reading
            array = result.as_numpy(output.name)
            decoded[output.name] = [] if array is None else list(array.ravel())
    return decoded


def _bytes_elements(data: bytes) -> list[bytes]:
    """A serialized BYTES tensor: each element a little-endian uint32 length, then its bytes."""
    elements = []
    offset, end = 0, len(data)
    while offset < end:
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        elements.append(data[offset : offset + length])
        offset += length
    return elements


_LENGTH = struct.Struct("<I")


def parse_logprobs(text: str) -> list[dict[str, Any]]:
    """The model's `logprobs` output (a JSON list, one entry per token) in OpenAI's shape."""
    try:
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError("not a list")
        return [_logprob_entry(entry, with_top=True) for entry in entries]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # A contract bug in the model; the text is still worth delivering.
        log.error("unreadable logprobs output from the model: %r", exc)
        return []


def _logprob_entry(entry: dict[str, Any], *, with_top: bool) -> dict[str, Any]:
    token = str(entry["token"])
    raw_bytes = entry.get("bytes")
    out: dict[str, Any] = {
        "token": token,
        "logprob": float(entry["logprob"]),
        "bytes": list(raw_bytes) if raw_bytes is not None else list(token.encode("utf-8")),
    }
    if with_top:
        out["top_logprobs"] = [
            _logprob_entry(top, with_top=False) for top in entry.get("top_logprobs") or []
        ]
    return out


def is_final_response(result: grpcclient.InferResult, chunk: GenerationChunk | None) -> bool:
    parameters = result.get_response().parameters
    if "triton_final_response" in parameters:
        return parameters["triton_final_response"].bool_param
    # Servers that do not flag final responses: the model sets finish_reason only at the end
    # (of the only choice: with n > 1 only the FINAL flag tells).
    return chunk is not None and chunk.finish_reason is not None


def model_error(error: InferenceServerException, request_id: str) -> APIError:
    """A model or Triton error as the client sees it. The model's errors are data
    (`model_contract`): a request error (written for clients) becomes a 400, busy or
    unavailable a 503 with Retry-After, not_found (an unknown LoRA adapter) a 404, internal a
    generic 500. Triton's own errors are only text: its phrases for a model that cannot take
    requests become 503 (`TRITON_ERRORS`: a dead model process `backend_unavailable`, an
    unloaded or stopping one `model_unavailable`), anything else 500.
    Only the log gets the original text."""
    message = error.message() or ""
    reported = decode_error(message)
    if reported is not None and reported.kind == "invalid_request":
        return client_error(reported)
    if reported is not None and reported.kind == "not_found":
        return MODEL_NOT_FOUND(reported.param or "model", message=reported.message)
    if reported is not None and reported.kind in ("busy", "unavailable"):
        log.warning("request %s: model %s: %s", request_id, reported.kind, reported.message)
        return SERVER_BUSY() if reported.kind == "busy" else MODEL_UNAVAILABLE()
    entry = triton_error(message) if reported is None else None
    if entry is not None:
        log.warning("request %s: model unavailable: %s", request_id, message)
        return entry()
    log.error("request %s: model error: %s", request_id, message)
    return INTERNAL_ERROR(request_id=request_id)


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def client_error(reported: ModelError) -> APIError:
    """The model's request error, in the model's words and with its param and code; the
    catalogue gives its status, type and cause (`MODEL_ERRORS`)."""
    entry = MODEL_ERRORS.get(reported.code or "", MODEL_REQUEST_ERROR)
    error = entry.with_message(reported.message, reported.param)
    # A code of a newer model, not catalogued yet, still reaches the client.
    error.code = reported.code
    return error


def _first_text(array: np.ndarray | None) -> str:
    return array.ravel()[0].decode("utf-8") if _has_items(array) else ""


def _has_items(array: np.ndarray | None) -> bool:
    return array is not None and array.size > 0


def _rpc_summary(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
