"""Test doubles and helpers for the proxy tier (imported by tests; fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator

from proxy.backend import GenerationChunk
from proxy.config import ProxyConfig
from proxy.translate import TritonRequest

SERVED_MODEL = "qwen2.5-vl-7b-instruct"
TEST_CONFIG = ProxyConfig(host="127.0.0.1", port=0, served_model_name=SERVED_MODEL)

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR-test-png"
JPEG_BYTES = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF-test-jpeg"


def data_url(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(image).decode()}"


def script(
    *texts: str, finish_reason: str = "stop", prompt_tokens: int = 7
) -> list[GenerationChunk]:
    """Chunks as the Triton backend yields them: one token each, finish_reason on the last."""
    return [
        GenerationChunk(
            text=text,
            finish_reason=finish_reason if i == len(texts) - 1 else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=1,
        )
        for i, text in enumerate(texts)
    ]


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
    ) -> None:
        self.chunks = chunks if chunks is not None else script("Hello", " world", "!")
        self.delay_s = delay_s
        self.error_at = error_at
        self.error = error
        self.ready = ready
        self.requests: list[tuple[TritonRequest, str]] = []
        self.stopped_early = asyncio.Event()  # closed or cancelled before the last chunk
        self.finished = False
        self.closed = False

    @property
    def last_request(self) -> TritonRequest:
        return self.requests[-1][0]

    async def generate(
        self, request: TritonRequest, request_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        self.requests.append((request, request_id))
        try:
            for index, chunk in enumerate(self.chunks):
                if index == self.error_at:
                    raise self.error
                if self.delay_s and index:
                    await asyncio.sleep(self.delay_s)
                yield chunk
            if self.error_at == len(self.chunks):
                raise self.error
            self.finished = True
        except (GeneratorExit, asyncio.CancelledError):
            self.stopped_early.set()
            raise

    async def is_ready(self) -> bool:
        return self.ready

    async def close(self) -> None:
        self.closed = True


def sse_payloads(raw: str) -> list[object]:
    """The `data:` payloads of an SSE body, parsed as JSON except the literal `[DONE]`."""
    assert raw.endswith("\n\n"), raw
    payloads: list[object] = []
    for event in raw.split("\n\n")[:-1]:
        assert event.startswith("data: "), event
        data = event[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
