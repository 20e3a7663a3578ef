"""`GET /playground`: a page to try the API from a browser (images or a video, a message, the
answer streamed in, the prompt's token count before sending, usage and stage timings after).

The page is static/: one HTML file, one script and one style sheet, read once at import and
served from memory. No build step, nothing fetched from elsewhere (no CDN, no web fonts), so it
works offline and on an air-gapped host.

Auth: a browser cannot send an `Authorization` header when it navigates to a page, so the page
and its two files are served without the key (`Auth.PAGE`, GET and HEAD only). They hold no
data: nothing about the model, the server or its users is in them, and they are the same for
everyone. The script asks for the key when the API answers 401 and sends it as a Bearer token
on every API call, like any other client: the API's auth is unchanged. The key is kept in the
tab's sessionStorage (gone when the tab closes, never written to disk as localStorage is, and
never sent by the browser on its own as a cookie would be, so other sites cannot make requests
with it). `--no-playground` (the default unless --host is a loopback address) leaves the routes
out of the app altogether.

Every answer carries a strict Content-Security-Policy: scripts and styles only from these files
(no inline script or style, no eval), requests only to this origin, images only as the data:
URLs the page makes of chosen files, no frames, forms or plugins. Model output, which is
untrusted text, is only ever set as text (`textContent`), never parsed as HTML.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..config import ServerSettings
from ..serving.routes import Handler

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",  # the API calls: this proxy only
        "img-src 'self' data:",  # previews of chosen images (their data: URLs)
        "base-uri 'none'",
        "form-action 'none'",  # the forms are handled by the script, never submitted
        "frame-ancestors 'none'",  # no framing (clickjacking)
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    # Served from memory and small: always revalidated, so an upgraded proxy's page is seen.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


def _load(name: str, content_type: str) -> StaticFile:
    return StaticFile((STATIC_DIR / name).read_bytes(), content_type)


PAGE = _load("index.html", "text/html")
ASSETS = {
    "playground.js": _load("playground.js", "text/javascript"),
    "playground.css": _load("playground.css", "text/css"),
}


def _handler(static: StaticFile) -> Handler:
    async def serve_static(request: web.Request) -> web.Response:
        return web.Response(
            body=static.body,
            content_type=static.content_type,
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    return serve_static


playground_page = _handler(PAGE)
playground_script = _handler(ASSETS["playground.js"])
playground_styles = _handler(ASSETS["playground.css"])


def playground_served(server: ServerSettings) -> bool:
    """Whether the proxy serves the playground: --playground / --no-playground when given,
    else only when it listens on a loopback address (a developer's machine, where the page is
    the quickest way to try the model; a proxy on the network shows unauthenticated clients
    nothing but the probes unless told to)."""
    if server.playground is not None:
        return server.playground
    return is_loopback(server.host)


def is_loopback(host: str) -> bool:
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # "" or a name: may be reachable from elsewhere
