"""Where the internal request's fields sit in the body the client sent.

Every API surface produces one internal request (proxy/request/schema.py's
`ChatCompletionRequest`), whose shape is the chat-completions body. A surface of another shape
(Responses: `input[3]`, `max_output_tokens`, `text.format`) hands the internal request its
`ClientPaths` when it translates, and every error of the shared path names the offending field
through it where the error is made, so a client always reads its own paths and nothing is
renamed afterwards. The model's errors name fields of the request it got, which is the internal
request's shape: they go through the same `ClientPaths` where they enter the proxy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_MESSAGE = re.compile(r"messages\[(\d+)\]")
_INDEX = "[*]"  # in a rename: any index, kept as it is
_STEP = re.compile(r"(?=[.\[])")  # where a path's next field or index begins


@dataclass(frozen=True)
class ClientPaths:
    """Internal path -> the client's. The default is the chat body's own (the identity)."""

    # Per internal message: (the client's path it came from, whether the path below the message
    # — `.content[1].image_url` — is the same below that origin). None: messages are the client's.
    messages: tuple[tuple[str, bool], ...] | None = None
    # (internal prefix, client prefix), first match wins; `[*]` stands for one index.
    renames: tuple[tuple[str, str], ...] = ()
    # Exact internal prefix -> the client's, the longest present wins; tried before the above.
    # Looked up once per step of the path, so a table as large as the request (a surface whose
    # messages split into several: Anthropic's tool_result blocks) costs nothing per lookup.
    prefixes: Mapping[str, str] | None = None

    def __call__(self, path: str) -> str:
        if self.prefixes is not None:
            for cut in reversed([m.start() for m in _STEP.finditer(path)] + [len(path)]):
                client = self.prefixes.get(path[:cut])
                if client is not None:
                    return client + path[cut:]
        if self.messages is not None:
            match = _MESSAGE.match(path)
            if match is not None:
                index = int(match[1])
                if index >= len(self.messages):
                    return self.messages[-1][0] if self.messages else path
                origin, keeps_rest = self.messages[index]
                return origin + path[match.end() :] if keeps_rest else origin
        for internal, client in self.renames:
            renamed = _renamed(path, internal, client)
            if renamed is not None:
                return renamed
        return path

    def optional(self, path: str | None) -> str | None:
        return None if path is None else self(path)


def _renamed(path: str, internal: str, client: str) -> str | None:
    head, star, tail = internal.partition(_INDEX)
    if star:
        pattern = re.escape(head) + r"\[(\d+)\]" + re.escape(tail)
    else:
        pattern = re.escape(internal)
    match = re.match(pattern + r"(?=$|[.\[])", path)
    if match is None:
        return None
    target = client.replace(_INDEX, f"[{match[1]}]") if star else client
    return target + path[match.end() :]


CHAT_PATHS = ClientPaths()
