"""Helpers for the hardening batteries: raw HTTP on a socket, leak checks, envelopes."""

from __future__ import annotations

import asyncio
import json
import re

from proxy_fakes import SERVED_MODEL

from proxy.api.messages.protocol import error_type
from proxy.error_catalogue import CATALOGUE

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
NORMAL_REQUEST = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}]}
# A plain request to each generating route (proxy/app.py ROUTES, `Admit.GENERATING`); a new
# generating route needs one here, or the per-route tests fail with a KeyError.
GENERATING_REQUESTS = {
    CHAT: NORMAL_REQUEST,
    RESPONSES: {"model": SERVED_MODEL, "input": "hi"},
    MESSAGES: {**NORMAL_REQUEST, "max_tokens": 16},  # Anthropic requires max_tokens
    "/v1/completions": {"model": SERVED_MODEL, "prompt": "hi"},
    "/tokenize": NORMAL_REQUEST,
    "/detokenize": {"model": SERVED_MODEL, "tokens": [11, 12, 13]},
}

# What must never reach a client: exception text, file paths, addresses, internals.
LEAK = re.compile(
    r"Traceback|File \"|\bPIL\b|Pillow|torch|transformers|grpc|tritonclient|InferenceServer"
    r"|BytesIO|\b0x[0-9a-fA-F]{6,}|\.py\b|site-packages|/usr/|/opt/|/home/|/tmp/|/work/"
    r"|\b(?:\d{1,3}\.){3}\d{1,3}\b|shm|_shm_|Errno|Exception|Error:",
)


def assert_no_leak(text: str) -> None:
    match = LEAK.search(text)
    assert match is None, f"leaked {match.group(0)!r} in {text[:500]!r}"


def assert_envelope(body: dict, code: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_route_envelope(path: str, body: dict, code: str) -> None:
    """The error `code` in the envelope of the route's API: Anthropic's on /v1/messages (its
    `type` from the code's status), OpenAI's elsewhere."""
    if path != MESSAGES:
        assert_envelope(body, code)
        return
    assert set(body) == {"type", "error", "request_id"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    assert body["error"]["type"] == error_type(CATALOGUE[code].status), body


async def raw_http(
    port: int,
    data: bytes,
    *,
    close_write: bool = False,
    timeout: float = 10.0,
) -> tuple[int | None, dict[str, str], bytes]:
    """Sends `data` as is on a fresh connection; (status, headers, body) of the answer, or
    (None, {}, b"") when the server closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close_write:
            writer.write_eof()
        raw = await asyncio.wait_for(_read_response(reader), timeout)
    finally:
        writer.close()
    if not raw:
        return None, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return status, headers, body


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = b""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
        return getattr(exc, "partial", b"") or b""
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if length:
        try:
            return head + await reader.readexactly(int(length.group(1)))
        except asyncio.IncompleteReadError as exc:
            return head + exc.partial
    try:
        return head + await reader.read()
    except ConnectionResetError:
        return head


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def post_head(path: str = CHAT, extra: str = "", length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode()


def json_bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()
