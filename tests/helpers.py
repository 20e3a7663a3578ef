"""Helpers every test tier shares: data URLs, SSE bodies, waiting for a condition, config.pbtxt
parameters."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sse_payloads(raw: str, strict: bool = True) -> list[object]:
    """The `data:` payloads of an SSE body, parsed as JSON except the literal `[DONE]`.
    `strict`: the body must be well framed (every event a `data:` line, ending in a blank
    line); otherwise other blocks are skipped."""
    if strict:
        assert raw.endswith("\n\n"), raw
    return sse_line_payloads(raw.split("\n\n")[:-1] if strict else raw.split("\n\n"), strict)


def sse_line_payloads(lines: Iterable[str], strict: bool = False) -> list[object]:
    """The same for an SSE body already split into lines (e.g. `response.iter_lines()`)."""
    payloads: list[object] = []
    for line in lines:
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


def config_pbtxt_parameters(path) -> dict[str, str]:
    """`parameters [{ key: "name" value: { string_value: "..." } }, ...]` of a config.pbtxt."""
    text = Path(path).read_text()
    return dict(re.findall(r'key: "([a-z_]+)",? value: \{ string_value: "([^"]*)" \}', text))
