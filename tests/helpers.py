"""Helpers every test tier shares: data URLs, SSE bodies, waiting for a condition (in plain
and in async code), config.pbtxt parameters."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sse_payloads(raw: str, strict: bool = True) -> list[object]:
    """The `data:` payloads of an SSE body, parsed as JSON except the literal `[DONE]`.
    `strict`: the body must be well framed (every event a `data:` line, ending in a blank
    line); otherwise other blocks are skipped."""
    if not strict:
        return sse_line_payloads(raw.split("\n\n"))
    assert raw.endswith("\n\n"), raw
    events = raw.split("\n\n")[:-1]
    assert all(events), f"an empty event in {raw!r}"
    return sse_line_payloads(events, strict=True)


def sse_line_payloads(lines: Iterable[str | bytes], strict: bool = False) -> list[object]:
    """The same for an SSE body already split into lines, str or bytes (decoded as strict
    UTF-8), as `response.iter_lines()` yields them; the blank lines between events are
    skipped."""
    payloads: list[object] = []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if not line:
            continue
        if strict:
            assert line.startswith("data: "), line
        elif not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def wait_until(
    condition: Callable[[], T], timeout: float = 20.0, what: str = "condition", step: float = 0.1
) -> T:
    """Polls `condition` until it returns something true, which it returns."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


async def wait_until_async(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = 20.0,
    what: str = "condition",
    step: float = 0.02,
) -> T:
    """`wait_until` for a test on an event loop: sleeps without blocking the loop, and
    `condition` may be a coroutine function (it is awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(step)


def config_pbtxt_parameters(path) -> dict[str, str]:
    """`parameters [{ key: "name" value: { string_value: "..." } }, ...]` of a config.pbtxt."""
    text = Path(path).read_text()
    return dict(re.findall(r'key: "([a-z_]+)",? value: \{ string_value: "([^"]*)" \}', text))
