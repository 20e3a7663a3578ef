"""The browser playground (proxy/playground/): its page and two files are served with a strict
Content-Security-Policy and without the API key (they hold no data) while the API they call
still needs it; --no-playground leaves them out of the app; auto serves them only on a
loopback --host. The page in a real browser: tests/e2e/test_playground_e2e.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from hardening_helpers import assert_envelope
from proxy_fakes import FakeBackend

from proxy.app import PLAYGROUND_ROUTES, ROUTES, served_routes
from proxy.config import ProxyConfig, parse_config, with_settings
from proxy.playground.routes import CONTENT_SECURITY_POLICY, STATIC_DIR, playground_served
from proxy.serving.routes import describe_routes

KEY = "playground-key-1234567890"
GOOD = {"Authorization": f"Bearer {KEY}"}
PAGE = "/playground"
SERVED = {
    PAGE: "text/html",
    "/playground/playground.js": "text/javascript",
    "/playground/playground.css": "text/css",
}


class _PageParts(HTMLParser):
    """The page's scripts, style sheets and attributes, as the browser would read them."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []  # src and href values
        self.inline_scripts: list[str] = []
        self.attributes: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.attributes += [name for name, _ in attrs]
        if tag == "script":
            self._in_script = True
        for name in ("src", "href"):
            if values.get(name) and not values[name].startswith("data:"):
                self.references.append(values[name])

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def page_parts(html: str) -> _PageParts:
    parts = _PageParts()
    parts.feed(html)
    return parts


async def test_the_page_and_its_files_are_served_with_a_strict_policy(make_client):
    client = await make_client(playground=True)
    for path, content_type in SERVED.items():
        response = await client.get(path)
        assert response.status == 200, path
        assert (response.content_type, response.charset) == (content_type, "utf-8")
        headers = response.headers
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert (await client.head(path)).status == 200, path
    policy = dict(directive.split(" ", 1) for directive in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == policy["base-uri"] == policy["form-action"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY  # no inline script or style, no eval


async def test_the_page_loads_only_its_own_files(make_client):
    """Everything the page references is served here (the policy would block anything else,
    and nothing is fetched from elsewhere: it works offline), and nothing is inline."""
    client = await make_client(playground=True)
    parts = page_parts(await (await client.get(PAGE)).text())
    assert parts.inline_scripts == []
    assert not [name for name in parts.attributes if name == "style" or name.startswith("on")]
    paths = {urljoin(PAGE, reference) for reference in parts.references}
    assert paths == set(SERVED) - {PAGE}
    for path in paths:
        assert (await client.get(path)).status == 200, path
    for name in ("index.html", "playground.js", "playground.css"):
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|@import|url\(", text), name


def test_the_script_never_turns_text_into_html_or_code():
    """Model output is untrusted: the script sets text only (the policy would also block an
    injected script, but not injected markup)."""
    script = (STATIC_DIR / "playground.js").read_text(encoding="utf-8")
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "Function(",
    ):
        assert sink not in script, sink


async def test_with_a_key_the_page_is_open_and_the_api_it_calls_is_not(make_client):
    client = await make_client(FakeBackend(), playground=True, api_key=KEY)
    for path in SERVED:
        assert (await client.get(path)).status == 200, path
        assert (await client.head(path)).status == 200, path
    # Only reading the page is open: another method is an unrouted request, closed as any.
    response = await client.post(PAGE, data=b"x")
    assert response.status == 401
    assert_envelope(await response.json(), "invalid_api_key")
    assert (await client.post(PAGE, data=b"x", headers=GOOD)).status == 405
    assert (await client.get("/playground/other.js")).status == 401
    assert (await client.get("/playground/other.js", headers=GOOD)).status == 404
    # What the page calls needs the key, as for any client.
    assert (await client.get("/v1/models")).status == 401
    assert (await client.post("/tokenize", json={"prompt": "hi"})).status == 401
    assert (await client.get("/v1/models", headers=GOOD)).status == 200
    assert (await client.post("/tokenize", json={"prompt": "hi"}, headers=GOOD)).status == 200


async def test_no_playground_leaves_its_routes_out(make_client):
    client = await make_client(playground=False)
    for path in SERVED:
        response = await client.get(path)
        assert response.status == 404, path
        assert_envelope(await response.json(), "not_found")
    keyed = await make_client(playground=False, api_key=KEY)
    for path in SERVED:  # unknown paths: closed without the key, as every other
        assert (await keyed.get(path)).status == 401, path
        assert (await keyed.get(path, headers=GOOD)).status == 404, path


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),  # every interface: the default, and in containers
        ("", False),
        ("::", False),
        ("10.1.2.3", False),
        ("proxy.internal", False),
    ],
)
def test_auto_serves_it_only_on_a_loopback_host(host, served):
    config = with_settings(ProxyConfig(), host=host)
    assert config.server.playground is None  # auto
    assert playground_served(config.server) is served
    assert (served_routes(config) == ROUTES) is served


def test_the_flag_beats_the_host(monkeypatch):
    assert playground_served(parse_config(["--host", "0.0.0.0", "--playground"]).server)
    assert not playground_served(parse_config(["--host", "127.0.0.1", "--no-playground"]).server)
    monkeypatch.setenv("PROXY_PLAYGROUND", "1")
    assert playground_served(parse_config(["--host", "0.0.0.0"]).server)
    monkeypatch.setenv("PROXY_PLAYGROUND", "off")
    assert not playground_served(parse_config(["--host", "localhost"]).server)


def test_the_startup_route_table_shows_whether_it_is_served():
    off = served_routes(with_settings(ProxyConfig(), host="0.0.0.0"))
    assert not set(PLAYGROUND_ROUTES) & set(off)
    assert "/playground" not in describe_routes(off, api_key=True, metrics_require_auth=False)
    on = describe_routes(
        served_routes(with_settings(ProxyConfig(), playground=True)),
        api_key=True,
        metrics_require_auth=False,
    )
    lines = [line for line in on.splitlines() if "/playground" in line]
    assert len(lines) == 3 and all(line.endswith("no key") for line in lines)
