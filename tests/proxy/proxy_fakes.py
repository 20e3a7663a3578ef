"""Test doubles and helpers for the proxy tier (imported by tests; fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sample_images import encoded_image

from proxy.app import create_app
from proxy.config import ProxyConfig, with_settings
from proxy.error_catalogue import MODEL_NOT_FOUND
from proxy.observability.tracing import Tracing
from proxy.transport.backend import Backend, GenerationChunk, TritonRequest
from proxy.transport.contract import LoraAdapter, ModelLimits, PromptPart, Task, TokenizeResult

SERVED_MODEL = "qwen2.5-vl-7b-instruct"
TRITON_MODEL = "qwen2_5_vl"
TEST_CONFIG = with_settings(
    ProxyConfig(),
    host="127.0.0.1",
    port=0,
    served_model_name=SERVED_MODEL,
    triton_model=TRITON_MODEL,
    # Stateless unless a test asks for state (state=True, state_dir=tmp_path): an app per
    # test must not write to the user's state directory, nor open a database it never uses.
    state=False,
)

# Real (tiny) images: the proxy reads each image's header before sending it on.
PNG_BYTES = encoded_image("PNG", size=(4, 3))
JPEG_BYTES = encoded_image("JPEG", size=(8, 6))
# The first bytes of an MP4 (an ISO base media `ftyp` box): the proxy sniffs signatures only.
MP4_BYTES = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64


def script(
    *texts: str,
    finish_reason: str = "stop",
    prompt_tokens: int = 7,
    image_tokens: int | None = None,
    logprobs: bool = False,
) -> list[GenerationChunk]:
    """Chunks as the Triton backend yields them: one token each, finish_reason on the last;
    with `logprobs`, each carries the entry of its token (logprob -0.5 * position)."""
    return [
        GenerationChunk(
            text=text,
            finish_reason=finish_reason if i == len(texts) - 1 else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=1,
            image_tokens=image_tokens,
            logprobs=[logprob_entry(text, -0.5 * i)] if logprobs else None,
        )
        for i, text in enumerate(texts)
    ]


# What the fake model answers to the tasks other than generation (one response each).
TOKENIZED = TokenizeResult(7, 4096, [11, 12, 13, 14, 15, 16, 17], [PromptPart("text", 7)])
TASK_ANSWERS = {Task.TOKENIZE: TOKENIZED.encode(), Task.DETOKENIZE: "Hello world!"}
LORA_TASKS = (Task.LIST_LORAS, Task.LOAD_LORA, Task.UNLOAD_LORA)


def logprob_entry(token: str, logprob: float) -> dict:
    top = [
        {"token": token, "logprob": logprob, "bytes": list(token.encode())},
        {"token": "?", "logprob": logprob - 1, "bytes": [63]},
    ]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}


class FakeBackend:
    """A `Backend` that plays scripted chunks and records how it was used."""

    def __init__(
        self,
        chunks: list[GenerationChunk] | None = None,
        *,
        delay_s: float = 0.0,
        error_at: int | None = None,
        error: BaseException | None = None,
        ready: bool = True,
        models: dict[str, str] | Exception | None = None,
    ) -> None:
        self.chunks = chunks if chunks is not None else script("Hello", " world", "!")
        self.delay_s = delay_s
        self.error_at = error_at
        self.error = error
        self.ready = ready
        # Triton's repository index; an exception makes the index call fail.
        self.models = models if models is not None else {TRITON_MODEL: "READY"}
        self.load_calls: list[str] = []
        self.load_delay_s = 0.0
        self.load_error: BaseException | None = None
        self.ready_calls: list[str] = []
        self.requests: list[tuple[TritonRequest, str]] = []
        self.stopped_early = asyncio.Event()  # closed or cancelled before the last chunk
        self.finished = False
        self.closed = False
        # What `describe` answers: the model's limits; None plays a model without describe,
        # an exception a model that cannot be asked.
        self.limits: ModelLimits | BaseException | None = ModelLimits()
        self.describe_calls: list[str] = []
        # The one response a tokenize or detokenize request gets, by task.
        self.task_answers: dict[Task, str] = dict(TASK_ANSWERS)
        # The LoRA adapters it serves, as list_loras answers them; load/unload change them.
        self.loras: dict[str, LoraAdapter] = {}

    @property
    def served_requests(self) -> list[tuple[TritonRequest, str]]:
        """`requests` but the proxy's own questions about LoRA adapters (an unknown `model`
        asks whether it names one): what clients' requests sent on."""
        return [item for item in self.requests if item[0].task is not Task.LIST_LORAS]

    @property
    def last_request(self) -> TritonRequest:
        return self.requests[-1][0]

    async def generate(
        self, request: TritonRequest, request_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        self.requests.append((request, request_id))
        chunks = self.chunks
        if request.task in LORA_TASKS:
            chunks = [GenerationChunk(text=self.lora_answer(request))]
        elif request.task is not Task.GENERATE:
            chunks = [GenerationChunk(text=self.task_answers[request.task])]
        try:
            for index, chunk in enumerate(chunks):
                if index == self.error_at:
                    raise self.error
                if self.delay_s and index:
                    await asyncio.sleep(self.delay_s)
                yield chunk
            if self.error_at == len(chunks):
                raise self.error
            self.finished = True
        except (GeneratorExit, asyncio.CancelledError):
            self.stopped_early.set()
            raise

    def lora_answer(self, request: TritonRequest) -> str:
        """What the model answers a LoRA task (contract.Task): its adapters, or the one loaded
        (rank 8) or unloaded; an unknown name to unload is the model's not_found."""
        name = request.lora or ""
        if request.task is Task.LOAD_LORA:
            self.loras[name] = LoraAdapter(name, 8, resident=True)
        elif request.task is Task.UNLOAD_LORA:
            if name not in self.loras:
                raise MODEL_NOT_FOUND("lora", message=f"no adapter {name}")
            return LoraAdapter.encode_list([self.loras.pop(name)])
        adapters = [self.loras[name]] if request.task is Task.LOAD_LORA else self.loras.values()
        return LoraAdapter.encode_list(list(adapters))

    async def is_ready(self, model: str) -> bool:
        self.ready_calls.append(model)
        return self.ready

    async def repository_index(self) -> dict[str, str]:
        if isinstance(self.models, Exception):
            raise self.models
        return dict(self.models)

    async def load_model(self, model: str) -> None:
        """Takes `load_delay_s`, then fails with `load_error` once or makes the model ready."""
        self.load_calls.append(model)
        await asyncio.sleep(self.load_delay_s)
        if self.load_error is not None:
            error, self.load_error = self.load_error, None
            raise error
        self.ready = True

    async def describe(self, model: str) -> ModelLimits | None:
        self.describe_calls.append(model)
        if isinstance(self.limits, BaseException):
            raise self.limits
        return self.limits

    async def close(self) -> None:
        self.closed = True


# ---- serving an app on loopback -------------------------------------------------------------


class _LoopbackServer(TestServer):
    """aiohttp's TestServer on 127.0.0.1, handler cancellation as asked (aiohttp's turns it on
    always, as `python -m proxy` does)."""

    def __init__(self, app: web.Application, handler_cancellation: bool) -> None:
        super().__init__(app, host="127.0.0.1")
        self.handler_cancellation = handler_cancellation

    async def _make_runner(self, **kwargs: object) -> web.AppRunner:
        return await super()._make_runner(
            **{**kwargs, "handler_cancellation": self.handler_cancellation}
        )


@contextlib.asynccontextmanager
async def serving_app(
    app: web.Application,
    *,
    handler_cancellation: bool = True,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[TestClient]:
    """`app` served on a free port of 127.0.0.1 (over TLS with `ssl_context`) until the block
    ends: a TestClient for it (`client.server.port`, `client.make_url(path)`)."""
    server = _LoopbackServer(app, handler_cancellation)
    await server.start_server(ssl=ssl_context)
    async with TestClient(server) as client:
        yield client


@contextlib.asynccontextmanager
async def serving(
    config: ProxyConfig = TEST_CONFIG,
    backend: Backend | None = None,
    *,
    fetcher: object | None = None,
    handler_cancellation: bool = True,
    tracing: Tracing | None = None,
) -> AsyncIterator[TestClient]:
    """The proxy app for `config` served as `serving_app` does, over `backend` (None: the real
    TritonBackend, connected to `config`'s Triton when the app starts) and `fetcher` (None: the
    app's own)."""
    app = create_app(config, backend, fetcher=fetcher, tracing=tracing)
    async with serving_app(app, handler_cancellation=handler_cancellation) as client:
        yield client
