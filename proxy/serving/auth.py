"""Optional API key: `Authorization: Bearer <key>` on every route but the probes.

The decision is made on the route aiohttp actually matched, through its entry in the route
table (proxy/serving/routes.py), never on the raw path, so `//v1/chat/completions`,
`/v1/../v1/chat/completions`, a trailing slash, percent-encoding or `/V1/...` cannot slip
past: a request is exempt only when it was routed with GET or HEAD to a route declared
`Auth.PROBE` (`/health`, `/ready`) or `Auth.SCRAPE` (`/metrics`, unless
--metrics-require-auth). Everything else, unknown paths and wrong methods included, needs the
key (default deny), so unauthenticated clients cannot even map which routes exist. Keys are
compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from aiohttp import web

from ..error_catalogue import INVALID_API_KEY
from .routes import Auth, route_of

_READ_METHODS = frozenset({"GET", "HEAD"})


class APIKeyError(ValueError):
    """The configured key or key file is unusable (reported at startup)."""


def read_api_key(key: str, key_file: str) -> str:
    """The key from `--api-key` or the file `--api-key-file` names (whitespace around it,
    such as the file's final newline, removed); "" when neither is set."""
    if key and key_file:
        raise APIKeyError("give --api-key or --api-key-file, not both")
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise APIKeyError(f"cannot read the API key file {key_file}: {exc}") from None
        if not key.strip():
            raise APIKeyError(f"the API key file {key_file} is empty")
    key = key.strip()
    if key and not key.isprintable():
        raise APIKeyError("the API key must be printable text")
    return key


def auth_middleware(api_key: str, exempt: frozenset[Auth]) -> Any:
    """`exempt`: the route policies answered without the key (routes.exempt_from_key)."""
    expected = api_key.encode("utf-8")

    @web.middleware
    async def require_api_key(request: web.Request, handler: Any) -> web.StreamResponse:
        route = route_of(request)
        if route is not None and route.auth in exempt and request.method in _READ_METHODS:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        presented = token.strip().encode("utf-8", "replace")
        # compare_digest first, so the time taken does not depend on which check failed.
        if not hmac.compare_digest(presented, expected) or scheme.lower() != "bearer":
            raise INVALID_API_KEY()
        return await handler(request)

    return require_api_key
