"""Reading an OpenAI chat stream (server-sent events) one line at a time: for client/chat.py
and bench/chat_bench.py, which read the lines their own ways (requests, aiohttp)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

DONE = "[DONE]"


def stream_event(line: bytes | str) -> dict | str | None:
    """The event a line of the stream carries: its `data:` payload parsed as JSON, DONE for the
    terminator, None for a line without data (the blank line between events, a comment). The
    space after `data:` is optional, as SSE has it; servers differ."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    return DONE if data == DONE else json.loads(data)


def stream_events(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The events of a stream's lines, up to its terminator."""
    for line in lines:
        event = stream_event(line)
        if event == DONE:
            return
        if event is not None:
            yield event
