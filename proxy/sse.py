"""Server-sent-event framing of OpenAI streams: `data: <json>` events ending in `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from .error_catalogue import APIError

DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    # Compact JSON keeps every event on one line, as SSE's `data:` field requires.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


def sse_error(error: APIError) -> bytes:
    """A mid-stream error: headers already said 200, so the envelope travels as an event."""
    return sse_event(error.envelope()) + DONE_EVENT
