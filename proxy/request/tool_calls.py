"""Tool calls out of the model's text: Qwen's `<tool_call>{"name": ..., "arguments": ...}
</tool_call>` blocks become OpenAI `tool_calls`.

Text before the first block is the message's content. A block that does not hold a JSON
object with a string `name` and an object `arguments` is not a call: its text stays content,
so a malformed call is never a server error. Streaming holds back only what could still be
the start of a block (`<tool_c...`), so content flows as it comes and no partial tag leaks.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..transport.contract import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

OPEN, CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE  # written by the model (its grammar), parsed here


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_call(block: str) -> ToolCall | None:
    """The call in the text between the tags; None when it is not one."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Splits streamed text into content and calls: `feed` each piece, then `finish`. Each
    returns the events ready so far, in order: ("content", str) or ("call", ToolCall)."""

    def __init__(self) -> None:
        self._pending = ""  # text not yet given out: a possible tag start, or an open block
        self._in_block = False
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        events: list[tuple[str, Any]] = []
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE)
                if end < 0:
                    return self._worth_sending(events)
                block, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
                self._in_block = False
                events.append(self._block(block))
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                events.append(("content", self._pending[:start]))
                self._pending = self._pending[start + len(OPEN) :]
                self._in_block = True
                continue
            keep = _partial_tag(self._pending)
            events.append(("content", self._pending[: len(self._pending) - keep]))
            self._pending = self._pending[len(self._pending) - keep :]
            return self._worth_sending(events)

    def finish(self) -> list[tuple[str, Any]]:
        """What is left: an unclosed block or a partial tag goes out as content."""
        rest = (OPEN if self._in_block else "") + self._pending
        self._pending, self._in_block = "", False
        return self._worth_sending([("content", rest)])

    def _worth_sending(self, events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        # Empty text is no event; once calls have begun, neither is the whitespace between them.
        return [
            (kind, value)
            for kind, value in events
            if kind == "call" or (value.strip() if self.calls else value)
        ]

    def _block(self, block: str) -> tuple[str, Any]:
        call = parse_call(block.strip())
        if call is None:
            return ("content", OPEN + block + CLOSE)
        self.calls += 1
        return ("call", call)


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole completion: its content (text outside calls, whitespace between blocks
    dropped) and its calls."""
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    calls = [value for kind, value in events if kind == "call"]
    content = "".join(value for kind, value in events if kind == "content")
    return (content.strip() if calls else content), calls
