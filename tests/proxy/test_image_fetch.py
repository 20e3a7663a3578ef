"""Remote media fetching and its SSRF guard, against local aiohttp servers on 127.0.0.1.

A spy connector records every connection attempt and a stub resolver stands in for DNS, so
"refused" means refused before any connection, and no test leaves the machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import data_url
from proxy_fakes import MP4_BYTES as MP4
from proxy_fakes import TEST_CONFIG, FakeBackend, serving, serving_app
from sample_images import encoded_image
from yarl import URL

from proxy.app import FETCHER_KEY, create_app
from proxy.config import parse_config, with_settings
from proxy.errors import APIError
from proxy.media.fetch import FetchPolicy, GuardedFetcher
from proxy.media.images import IMAGE
from proxy.media.kinds import MediaRef
from proxy.media.videos import VIDEO

PNG = encoded_image("PNG", size=(40, 30))
JPEG = encoded_image("JPEG", size=(56, 28))
CAP = 256 * 1024


# ---- the image server ------------------------------------------------------------------


@dataclasses.dataclass
class ServerState:
    hits: list = dataclasses.field(default_factory=list)
    host_headers: list = dataclasses.field(default_factory=list)
    endless_sent: int = 0
    endless_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    endless_reset: bool = False
    in_flight: int = 0
    max_in_flight: int = 0


def image_app(state: ServerState) -> web.Application:
    async def record(request: web.Request, handler):
        state.hits.append(request.path)
        state.host_headers.append(request.headers.get("Host"))
        return await handler(request)

    async def png(request):
        return web.Response(body=PNG, content_type="image/png")

    async def mp4(request):
        return web.Response(body=MP4, content_type="video/mp4")

    async def jpeg_as_text(request):  # sniffed, not trusted: still an image
        return web.Response(body=JPEG, content_type="text/plain")

    async def html_as_png(request):
        return web.Response(body=b"<html><body>hi</body></html>", content_type="image/png")

    async def chunked(request):
        response = web.StreamResponse()
        response.content_type = "image/png"
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(PNG), 97):
            await response.write(PNG[start : start + 97])
        await response.write_eof()
        return response

    async def endless(request):
        response = web.StreamResponse()
        response.content_type = "image/png"
        await response.prepare(request)
        try:
            await response.write(PNG[:16])
            while state.endless_sent < 1024 * 1024 * 1024:  # a safety stop at 1 GiB
                await response.write(b"\0" * 65536)
                state.endless_sent += 65536
        except (ConnectionError, RuntimeError):  # the client dropped the connection
            state.endless_reset = True
        except asyncio.CancelledError:  # ... noticed by aiohttp, which cancels the handler
            state.endless_reset = True
            raise
        finally:
            state.endless_done.set()
        return response

    async def declared_big(request):
        return web.Response(body=PNG + b"\0" * (CAP + 1), content_type="image/png")

    async def slow_headers(request):
        await asyncio.sleep(10)
        return web.Response(body=PNG, content_type="image/png")

    async def slow_body(request):
        response = web.StreamResponse()
        response.content_type = "image/png"
        await response.prepare(request)
        for byte in PNG:
            await response.write(bytes([byte]))
            await asyncio.sleep(0.1)
        return response

    async def slow_png(request):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(0.2)
        finally:
            state.in_flight -= 1
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(request):
        left = int(request.match_info["n"])
        if left == 0:
            return web.Response(body=PNG, content_type="image/png")
        raise web.HTTPFound(f"/redirect/{left - 1}")  # relative Location

    async def redirect_to(request):
        raise web.HTTPFound(request.query["to"])

    async def not_found(request):
        raise web.HTTPNotFound()

    app = web.Application(middlewares=[web.middleware(record)])
    app.router.add_get("/png", png)
    app.router.add_get("/mp4", mp4)
    app.router.add_get("/jpeg-as-text", jpeg_as_text)
    app.router.add_get("/html-as-png", html_as_png)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/endless", endless)
    app.router.add_get("/declared-big", declared_big)
    app.router.add_get("/slow-headers", slow_headers)
    app.router.add_get("/slow-body", slow_body)
    app.router.add_get("/slow-png/{i}", slow_png)
    app.router.add_get("/redirect/{n}", redirect)
    app.router.add_get("/redirect-to", redirect_to)
    app.router.add_get("/missing", not_found)
    return app


@pytest.fixture
async def server():
    """(state, base url) of an image server on 127.0.0.1."""
    state = ServerState()
    async with serving_app(image_app(state)) as images:
        yield state, f"http://127.0.0.1:{images.server.port}"


# ---- spies -----------------------------------------------------------------------------


class StubResolver:
    """Stands in for DNS; unknown names fail as NXDOMAIN would."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names = names or {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


class ConnectionSpy:
    """A connector factory whose connectors record every connection attempt."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.attempts: list[str] = []
        self.ssl_context = ssl_context

    def __call__(self, resolver):
        attempts = self.attempts

        class SpyConnector(aiohttp.TCPConnector):
            async def connect(self, req, traces, timeout):
                attempts.append(str(req.url))
                return await super().connect(req, traces, timeout)

        ssl_arg = self.ssl_context if self.ssl_context is not None else True
        return SpyConnector(resolver=resolver, use_dns_cache=False, ssl=ssl_arg)


HOSTILE_NAMES = {
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": ["93.184.216.34", "10.0.0.5"],
    "v6mapped.example": ["::ffff:10.0.0.1"],
    "cgnat.example": ["100.64.1.2"],
}


def make_fetcher(
    resolver=None, spy=None, **policy
) -> tuple[GuardedFetcher, StubResolver, ConnectionSpy]:
    resolver = resolver or StubResolver(HOSTILE_NAMES)
    spy = spy or ConnectionSpy()
    policy.setdefault("timeout_s", 5.0)
    fetcher = GuardedFetcher(FetchPolicy(**policy), resolve=resolver, connector_factory=spy)
    return fetcher, resolver, spy


async def fetch_error(fetcher: GuardedFetcher, url: str) -> APIError:
    with pytest.raises(APIError) as caught:
        await fetcher.fetch_all([MediaRef(IMAGE, url, "messages[0].content[0].image_url")])
    return caught.value


LOCAL = {"allow_private_hosts": ("127.0.0.1",)}


# ---- what is fetched -------------------------------------------------------------------


async def test_fetches_an_image(server):
    state, base = server
    fetcher, _, spy = make_fetcher(**LOCAL)
    assert await fetcher.fetch_all([MediaRef(IMAGE, f"{base}/png", "p")]) == [PNG]
    assert spy.attempts == [f"{base}/png"]


async def test_content_is_sniffed_not_taken_from_content_type(server):
    _, base = server
    fetcher, _, _ = make_fetcher(**LOCAL)
    assert await fetcher.fetch_all([MediaRef(IMAGE, f"{base}/jpeg-as-text", "p")]) == [JPEG]
    error = await fetch_error(fetcher, f"{base}/html-as-png")
    assert (error.status, error.code) == (400, "invalid_image")
    assert error.param == "messages[0].content[0].image_url"


async def test_chunked_body_is_reassembled(server):
    _, base = server
    fetcher, _, _ = make_fetcher(**LOCAL)
    assert await fetcher.fetch_all([MediaRef(IMAGE, f"{base}/chunked", "p")]) == [PNG]


async def test_http_error_status_is_image_fetch_failed(server):
    _, base = server
    fetcher, _, _ = make_fetcher(**LOCAL)
    error = await fetch_error(fetcher, f"{base}/missing")
    assert error.code == "image_fetch_failed"
    assert "HTTP 404" in error.message


async def test_connection_refused_is_image_fetch_failed_without_details():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    fetcher, _, _ = make_fetcher(**LOCAL)
    error = await fetch_error(fetcher, f"http://127.0.0.1:{port}/png")
    assert error.code == "image_fetch_failed"
    assert "127.0.0.1" not in error.message and str(port) not in error.message
    assert "Errno" not in error.message and "Connect" not in error.message


async def test_unresolvable_host_is_image_fetch_failed():
    fetcher, resolver, spy = make_fetcher()
    error = await fetch_error(fetcher, "http://no-such-host.example/a.png")
    assert error.code == "image_fetch_failed"
    assert resolver.calls == ["no-such-host.example"] and spy.attempts == []


# ---- size cap and timeouts -------------------------------------------------------------


async def test_endless_body_is_cut_off_at_the_cap_while_reading(server):
    state, base = server
    fetcher, _, _ = make_fetcher(max_bytes=CAP, **LOCAL)
    started = time.monotonic()
    error = await fetch_error(fetcher, f"{base}/endless")
    assert error.code == "image_too_large"
    assert str(CAP) in error.message
    assert time.monotonic() - started < 5
    await asyncio.wait_for(state.endless_done.wait(), 10)
    # The server noticed the dropped connection long before it could send much: the cap
    # was enforced mid-read, not after reading everything.
    assert state.endless_reset
    assert state.endless_sent < 64 * 1024 * 1024


async def test_declared_length_over_the_cap_is_refused_before_reading(server):
    _, base = server
    fetcher, _, _ = make_fetcher(max_bytes=CAP, **LOCAL)
    error = await fetch_error(fetcher, f"{base}/declared-big")
    assert error.code == "image_too_large"


async def test_body_at_the_cap_is_accepted(server):
    _, base = server
    fetcher, _, _ = make_fetcher(max_bytes=len(PNG), **LOCAL)
    assert await fetcher.fetch_all([MediaRef(IMAGE, f"{base}/png", "p")]) == [PNG]
    fetcher, _, _ = make_fetcher(max_bytes=len(PNG) - 1, **LOCAL)
    assert (await fetch_error(fetcher, f"{base}/png")).code == "image_too_large"


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
async def test_slow_server_is_image_fetch_timeout(server, path):
    _, base = server
    fetcher, _, _ = make_fetcher(timeout_s=0.5, **LOCAL)
    started = time.monotonic()
    error = await fetch_error(fetcher, base + path)
    assert (error.status, error.code) == (400, "image_fetch_timeout")
    assert time.monotonic() - started < 3


async def test_a_video_is_fetched_under_the_video_limits_and_sniffed_as_a_video(server):
    _, base = server
    video = [MediaRef(VIDEO, f"{base}/mp4", "p")]
    fetcher, _, _ = make_fetcher(max_bytes=16, video_max_bytes=len(MP4), **LOCAL)
    assert await fetcher.fetch_all(video) == [MP4]
    fetcher, _, _ = make_fetcher(video_max_bytes=len(MP4) - 1, **LOCAL)
    assert (await fetch_error(fetcher, f"{base}/mp4")).code == "invalid_image"  # asked as one
    with pytest.raises(APIError) as caught:
        await fetcher.fetch_all(video)
    assert (caught.value.code, caught.value.param) == ("video_too_large", "p")
    fetcher, _, _ = make_fetcher(timeout_s=5.0, video_timeout_s=0.3, **LOCAL)
    with pytest.raises(APIError) as caught:
        await fetcher.fetch_all([MediaRef(VIDEO, f"{base}/slow-headers", "p")])
    assert caught.value.code == "video_fetch_timeout"


# ---- redirects -------------------------------------------------------------------------


async def test_up_to_three_redirects_are_followed(server):
    state, base = server
    fetcher, _, spy = make_fetcher(**LOCAL)
    assert await fetcher.fetch_all([MediaRef(IMAGE, f"{base}/redirect/3", "p")]) == [PNG]
    assert state.hits == ["/redirect/3", "/redirect/2", "/redirect/1", "/redirect/0"]


async def test_more_than_three_redirects_fail(server):
    state, base = server
    fetcher, _, _ = make_fetcher(**LOCAL)
    error = await fetch_error(fetcher, f"{base}/redirect/4")
    assert error.code == "image_fetch_failed"
    assert "redirect" in error.message
    assert state.hits == ["/redirect/4", "/redirect/3", "/redirect/2", "/redirect/1"]


@pytest.mark.parametrize(
    "target",
    [
        "http://localhost:{port}/png",  # the same server under a name that is not allowed
        "http://[::1]:{port}/png",
        "http://127.0.0.2:{port}/png",
        "http://169.254.169.254/latest/meta-data/",
        "http://internal.example:{port}/png",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1:{port}/png",
    ],
)
async def test_redirect_hops_are_checked_like_the_first_url(server, target):
    state, base = server
    port = base.rsplit(":", 1)[1]
    fetcher, _, spy = make_fetcher(**LOCAL)  # only 127.0.0.1 itself is allowed
    first = str(URL(base).with_path("/redirect-to").with_query(to=target.format(port=port)))
    error = await fetch_error(fetcher, first)
    assert error.code == "image_url_forbidden"
    assert spy.attempts == [first]  # nothing was opened for the hop
    assert state.hits == ["/redirect-to"]


# ---- hostile URLs ----------------------------------------------------------------------

FORBIDDEN = "image_url_forbidden"
HOSTILE_URLS = [
    ("http://127.0.0.1/", FORBIDDEN),
    ("http://127.0.0.1:8001/v2/models", FORBIDDEN),
    ("https://127.0.0.1/", FORBIDDEN),
    ("http://localhost/", FORBIDDEN),
    ("http://LOCALHOST./a.png", FORBIDDEN),
    ("http://img.localhost/a.png", FORBIDDEN),
    ("http://[::1]/", FORBIDDEN),
    ("http://0.0.0.0/", FORBIDDEN),
    ("http://169.254.169.254/latest/meta-data", FORBIDDEN),
    ("http://10.0.0.1/", FORBIDDEN),
    ("http://192.168.1.1/", FORBIDDEN),
    ("http://172.16.0.1/", FORBIDDEN),
    ("http://100.64.0.1/", FORBIDDEN),
    ("http://224.0.0.1/", FORBIDDEN),
    ("http://255.255.255.255/", FORBIDDEN),
    ("http://240.0.0.1/", FORBIDDEN),
    ("http://[::ffff:127.0.0.1]/", FORBIDDEN),
    ("http://[::ffff:169.254.169.254]/", FORBIDDEN),
    ("http://[::127.0.0.1]/", FORBIDDEN),
    ("http://[64:ff9b::10.0.0.1]/", FORBIDDEN),
    ("http://[2002:7f00:1::1]/", FORBIDDEN),
    ("http://[fe80::1]/", FORBIDDEN),
    ("http://[fd00:ec2::254]/", FORBIDDEN),
    ("http://[fc00::1]/", FORBIDDEN),
    ("http://[ff02::1]/", FORBIDDEN),
    ("http://[::]/", FORBIDDEN),
    ("http://2130706433/", FORBIDDEN),
    ("http://0x7f000001/", FORBIDDEN),
    ("http://127.1/", FORBIDDEN),
    ("http://017700000001/", FORBIDDEN),
    ("http://0177.0.0.1/", FORBIDDEN),
    ("file:///etc/passwd", FORBIDDEN),
    ("ftp://x/a.png", FORBIDDEN),
    ("gopher://x/", FORBIDDEN),
    ("data:text/html,<script>alert(1)</script>", "invalid_image"),
    ("http://user:pass@127.0.0.1/", FORBIDDEN),
    ("http://user@images.example.com/a.png", FORBIDDEN),
    ("http://internal.example/a.png", FORBIDDEN),  # resolves to 127.0.0.1
    ("http://metadata.example/", FORBIDDEN),  # resolves to 169.254.169.254
    ("http://mixed.example/", FORBIDDEN),  # one public, one private address
    ("http://v6mapped.example/", FORBIDDEN),  # resolves to ::ffff:10.0.0.1
    ("http://cgnat.example/", FORBIDDEN),
    ("http://%6c%6fcalhost/", FORBIDDEN),
    ("http://127.0.0.1:99999/", "invalid_image_url"),
    ("http:///a.png", "invalid_image_url"),
]


def hostile_body(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]}


@pytest.mark.parametrize("url, code", HOSTILE_URLS)
async def test_hostile_urls_are_400_without_any_connection(url, code):
    fetcher, resolver, spy = make_fetcher()
    backend = FakeBackend()
    async with serving(TEST_CONFIG, backend, fetcher=fetcher) as client:
        resp = await client.post("/v1/chat/completions", json=hostile_body(url))
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["code"] == code
    assert body["error"]["param"] == "messages[0].content[1].image_url"
    assert spy.attempts == []
    assert backend.requests == []
    for address in ("127.0.0.1", "169.254.169.254", "10.0.0.5", "::1", "Errno"):
        if address not in url:
            assert address not in body["error"]["message"]
    # A name is resolved once at most (and only names the stub knows get that far).
    assert len(resolver.calls) <= 1 and set(resolver.calls) <= set(HOSTILE_NAMES)


async def test_names_are_resolved_once_and_the_connection_goes_to_the_vetted_address(server):
    """images.test exists only in the stub resolver: the fetch succeeding proves aiohttp
    connected to the vetted address instead of resolving again, with the Host header kept."""
    state, base = server
    port = base.rsplit(":", 1)[1]
    resolver = StubResolver({"images.test": ["127.0.0.1"]})
    fetcher, _, spy = make_fetcher(resolver, allow_private_hosts=("images.test",))
    url = f"http://images.test:{port}/png"
    assert await fetcher.fetch_all([MediaRef(IMAGE, url, "p")]) == [PNG]
    assert resolver.calls == ["images.test"]
    assert spy.attempts == [url]
    assert state.host_headers == [f"images.test:{port}"]


async def test_allow_private_hosts_is_per_name_not_per_address(server):
    _, base = server
    port = base.rsplit(":", 1)[1]
    resolver = StubResolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    fetcher, _, spy = make_fetcher(resolver, allow_private_hosts=("images.test",))
    error = await fetch_error(fetcher, f"http://other.test:{port}/png")
    assert error.code == "image_url_forbidden" and spy.attempts == []


# ---- domain allowlist ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("http://cdn.example.org:{port}/png", True),
        ("http://example.org:{port}/png", True),
        ("http://CDN.Example.Org.:{port}/png", True),
        ("http://example.org.evil.test:{port}/png", False),
        ("http://notexample.org:{port}/png", False),
        ("http://127.0.0.1:{port}/png", False),  # literals never match a domain
    ],
)
async def test_domain_allowlist_is_a_suffix_match_on_names(server, url, allowed):
    _, base = server
    url = url.format(port=base.rsplit(":", 1)[1])
    names = ["cdn.example.org", "example.org", "example.org.evil.test", "notexample.org"]
    resolver = StubResolver({name: ["127.0.0.1"] for name in names})
    fetcher, _, spy = make_fetcher(
        resolver,
        allowed_domains=("example.org",),
        allow_private_hosts=(*names, "127.0.0.1"),
    )
    if allowed:
        assert await fetcher.fetch_all([MediaRef(IMAGE, url, "p")]) == [PNG]
    else:
        error = await fetch_error(fetcher, url)
        assert error.code == "image_url_forbidden" and "allowed domains" in error.message
        assert spy.attempts == [] and resolver.calls == []


# ---- https -----------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_https_keeps_the_host_name_for_sni_and_certificate_checks(tls_files):
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    seen_sni: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    state = ServerState()
    async with serving_app(image_app(state), ssl_context=server_context) as images:
        port = images.server.port
        client_context = ssl.create_default_context(cafile=str(cert))
        resolver = StubResolver({"images.test": ["127.0.0.1"]})
        spy = ConnectionSpy(client_context)
        fetcher, _, _ = make_fetcher(resolver, spy, allow_private_hosts=("images.test",))
        url = f"https://images.test:{port}/png"
        assert await fetcher.fetch_all([MediaRef(IMAGE, url, "p")]) == [PNG]
        assert seen_sni == ["images.test"]
        assert state.host_headers == [f"images.test:{port}"]


# ---- through the app -------------------------------------------------------------------


async def test_app_fetches_remote_images_in_order_with_inline_ones(server):
    state, base = server
    backend = FakeBackend()
    config = with_settings(TEST_CONFIG, image_fetch_allow_private_hosts=("127.0.0.1",))
    async with serving(config, backend) as client:
        parts = [
            {"type": "image_url", "image_url": {"url": f"{base}/jpeg-as-text"}},
            {"type": "image_url", "image_url": {"url": data_url(PNG)}},
            {"type": "image_url", "image_url": {"url": f"{base}/chunked", "detail": "low"}},
        ]
        body = {"messages": [{"role": "user", "content": parts}]}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
    assert backend.last_request.media["image"] == [JPEG, PNG, PNG]


async def test_fetches_of_one_request_run_concurrently_within_the_bound(server):
    state, base = server
    fetcher, _, _ = make_fetcher(concurrency=2, **LOCAL)
    refs = [MediaRef(IMAGE, f"{base}/slow-png/{i}", f"p{i}") for i in range(5)]
    assert await fetcher.fetch_all(refs) == [PNG] * 5
    assert state.max_in_flight == 2


async def test_first_failure_fails_the_request_and_cancels_the_rest(server):
    state, base = server
    fetcher, _, _ = make_fetcher(concurrency=4, **LOCAL)
    refs = [
        MediaRef(IMAGE, f"{base}/slow-headers", "p0"),
        MediaRef(IMAGE, f"{base}/missing", "p1"),
        MediaRef(IMAGE, f"{base}/slow-headers", "p2"),
    ]
    started = time.monotonic()
    with pytest.raises(APIError) as caught:
        await fetcher.fetch_all(refs)
    assert (caught.value.code, caught.value.param) == ("image_fetch_failed", "p1")
    assert time.monotonic() - started < 3  # did not wait for the slow ones


def test_the_image_fetch_flags_make_the_apps_fetch_policy():
    config = parse_config(
        [
            "--image-fetch-allowed-domains=example.org",
            "--image-fetch-allow-private-hosts=127.0.0.1",
            "--image-fetch-max-bytes=1000",
            "--image-fetch-connect-timeout-s=1.5",
            "--image-fetch-timeout-s=7",
            "--image-fetch-concurrency=3",
        ]
    )
    policy = FetchPolicy(
        allowed_domains=("example.org",),
        allow_private_hosts=("127.0.0.1",),
        max_bytes=1000,
        connect_timeout_s=1.5,
        timeout_s=7.0,
        concurrency=3,
    )
    assert config.fetch == policy
    fetcher = create_app(config, FakeBackend())[FETCHER_KEY]
    assert isinstance(fetcher, GuardedFetcher) and fetcher.policy == policy
    assert FETCHER_KEY not in create_app(with_settings(config, image_fetch=False), FakeBackend())


async def test_environment_proxies_are_not_used(server, monkeypatch):
    _, base = server
    # A proxy that would receive the request (and resolve names itself) if it were used.
    monkeypatch.setenv("HTTP_PROXY", "http://10.255.255.1:3128")
    monkeypatch.setenv("http_proxy", "http://10.255.255.1:3128")
    fetcher, _, _ = make_fetcher(connect_timeout_s=1.0, **LOCAL)
    assert await fetcher.fetch_all([MediaRef(IMAGE, f"{base}/png", "p")]) == [PNG]
