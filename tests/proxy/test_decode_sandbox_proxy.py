"""The proxy reads image headers in its decode sandbox (proxy/media/decoding.py): a header
parser that crashes or hangs costs that image a fixed 400 and its worker a replacement, and the
next request is served. The hooks come from the environment the app starts in, never a request."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import pytest
from hardening_helpers import CHAT, assert_envelope, assert_no_leak
from hostile_samples import GOOD_JPEG, TRUNCATED_JPEG
from proxy_fakes import FakeBackend

from proxy.media import decoding, sandbox

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = "messages[0].content[1].image_url"


def with_image(data: bytes, media_type: str = "image/png") -> dict:
    url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, part]}]}


@pytest.fixture
async def hooked_client(make_client, monkeypatch):
    monkeypatch.setenv(sandbox.TEST_HOOKS_ENV, "1")
    client = await make_client(FakeBackend(), decode_workers=1, decode_timeout_s=0.5)
    decoding.pool().wait_ready()
    yield client


@pytest.mark.parametrize(
    "marker", [sandbox.CRASH_MARKER, sandbox.HANG_MARKER], ids=["crash", "hang"]
)
async def test_a_header_parser_that_dies_or_hangs_costs_one_image_a_fixed_400(
    hooked_client, marker
):
    pool = decoding.pool()
    replaced = pool.replaced
    response = await hooked_client.post(CHAT, json=with_image(PNG_SIGNATURE + marker))
    assert response.status == 400
    text = await response.text()
    assert_no_leak(text)
    error = assert_envelope(await response.json(), "invalid_image")
    assert error["param"] == IMAGE
    assert pool.replaced == replaced + 1
    served = await hooked_client.post(CHAT, json=with_image(GOOD_JPEG, "image/jpeg"))
    assert served.status == 200, await served.text()


def test_only_the_sandbox_imports_a_decoder_library():
    """Pillow and PyAV stay in the workers: no other proxy module imports them."""
    root = Path(decoding.__file__).resolve().parents[1]
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("PIL", "av") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"media/sandbox.py"}


async def test_a_truncated_header_is_a_fixed_400_from_the_worker(make_client):
    client = await make_client(FakeBackend())
    response = await client.post(CHAT, json=with_image(TRUNCATED_JPEG, "image/jpeg"))
    assert response.status == 400
    assert_no_leak(await response.text())
    assert_envelope(await response.json(), "invalid_image")
