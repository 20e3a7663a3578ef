"""A batch's input file, line by line: split as its chunks stream in (never the whole file in
memory, and never more than one line's limit of a line), and each line checked against
OpenAI's request-input format:

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

A line that fails a check is not the batch's failure: it becomes an entry of the error file
(`BadLine`), and the other lines run. What only the endpoint can judge (the model, the
messages, the images) is judged when the line runs, exactly as for an interactive request,
and its error response goes to the error file the same way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from ...error_catalogue import (
    BATCH_LINE_TOO_LARGE,
    INVALID_BATCH_LINE,
    INVALID_JSON_LINE,
    APIError,
)
from ...errors import json_dumps

# Body fields whose answer is not one JSON object, so a line cannot use them.
_UNBATCHABLE = {
    "/v1/chat/completions": ("stream",),
    "/v1/responses": ("stream", "background"),
}


@dataclass(frozen=True)
class RequestLine:
    custom_id: str
    body: str  # the request body as JSON text


@dataclass(frozen=True)
class BadLine:
    custom_id: str | None  # when the line had a usable one
    error: APIError


async def split_lines(
    chunks: AsyncIterable[bytes], max_bytes: int
) -> AsyncIterator[tuple[int, bytes | None]]:
    """(line number from 1, the line without its end of line) for every line of the stream,
    blank ones included; None instead of the bytes of a line longer than `max_bytes`, whose
    bytes are skipped as they stream, never held."""
    number = 0
    line = bytearray()
    too_long = False
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not too_long:
                line += piece
                if len(line) > max_bytes + 1:  # + 1: a "\r" before the "\n" is not the line's
                    too_long = True
                    line.clear()
            if end < 0:
                break
            number += 1
            yield number, None if too_long else _without_cr(line, max_bytes)
            line.clear()
            too_long = False
            start = end + 1
    if line or too_long:
        yield number + 1, None if too_long else _without_cr(line, max_bytes)


def _without_cr(line: bytearray, max_bytes: int) -> bytes | None:
    text = bytes(line[:-1] if line.endswith(b"\r") else line)
    return None if len(text) > max_bytes else text


def is_blank(raw: bytes | None) -> bool:
    return raw is not None and not raw.strip()


def parse_line(
    number: int, raw: bytes | None, endpoint: str, max_bytes: int
) -> RequestLine | BadLine:
    """One line of the input file of a batch to `endpoint` (`raw` None: over `max_bytes`)."""
    if raw is None:
        return BadLine(None, BATCH_LINE_TOO_LARGE(limit=max_bytes, line=number))
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "it is not valid JSON" if isinstance(exc, ValueError) else "it nests too deep"
        return BadLine(None, INVALID_JSON_LINE(line=number, reason=reason))
    if not isinstance(line, dict):
        return BadLine(None, INVALID_JSON_LINE(line=number, reason=f"it is a {_kind(line)}"))
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(None, _bad("custom_id", f"Line {number} has no custom_id (a string)."))

    def bad(param: str, message: str) -> BadLine:
        return BadLine(custom_id, _bad(param, f"Line {number}: {message}"))

    if line.get("method") != "POST":
        return bad("method", f"method must be POST, not {shown(line.get('method'))}.")
    url = line.get("url")
    if url != endpoint:
        return bad("url", f"url must be {endpoint}, the batch's endpoint, not {shown(url)}.")
    body = line.get("body")
    if not isinstance(body, dict):
        return bad("body", f"body must be a JSON object, not {_kind(body)}.")
    for name in _UNBATCHABLE[endpoint]:
        if body.get(name) is True:
            return bad(f"body.{name}", f"body.{name} is not supported in a batch.")
    return RequestLine(custom_id, json_dumps(body))


def _bad(param: str, message: str) -> APIError:
    return INVALID_BATCH_LINE(param, message=message)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")


def shown(value: Any) -> str:
    """A field's value in a message: short, and JSON so that its type shows."""
    if value is None:
        return "missing"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
