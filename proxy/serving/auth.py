"""Optional API key: `Authorization: Bearer <key>` on every route but the probes (and, on a
route declared `Auth.X_API_KEY`, `x-api-key: <key>`: Anthropic's header).

The decision is made on the route aiohttp actually matched, through its entry in the route
table (proxy/serving/routes.py), never on the raw path, so `//v1/chat/completions`,
`/v1/../v1/chat/completions`, a trailing slash, percent-encoding or `/V1/...` cannot slip
past: a request is exempt only when it was routed with GET or HEAD to a route declared
`Auth.PROBE` (`/health`, `/ready`), `Auth.PAGE` (the playground's static files, when served:
they hold no data, and its script sends the key on its API calls) or `Auth.SCRAPE`
(`/metrics`, unless --metrics-require-auth). Everything else, unknown paths and wrong
methods included, needs the key (default deny), so unauthenticated clients cannot even map
which routes exist. Keys are compared with `hmac.compare_digest`, every configured key each
time.

Several keys may be configured (comma-separated, or one per line of --api-key-file); each is
its own tenant of stored objects (proxy/state/tenancy.py): the middleware puts the tenant of
the key presented on the request.

`Auth.ADMIN` routes (LoRA load/unload) take the admin key (--admin-api-key) alone, from their
own middleware (`admin_middleware`), which comes first: a client key never opens them, and the
client-key middleware leaves them to it. Without an admin key they are not served at all.

On an `Auth.X_API_KEY` route (POST /v1/messages) the key is `x-api-key` when that header is
sent, else the Bearer token: one key is presented and compared either way, never the better of
two headers.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from aiohttp import web

from ..error_catalogue import INVALID_API_KEY
from ..state.tenancy import TENANT_KEY, tenant_of
from .routes import Auth, Route, route_of

_READ_METHODS = frozenset({"GET", "HEAD"})
X_API_KEY = "x-api-key"  # Anthropic's API key header (aiohttp's headers are case-insensitive)


class APIKeyError(ValueError):
    """The configured key or key file is unusable (reported at startup)."""


KEY_SEPARATOR = ","  # between keys in --api-key / PROXY_API_KEY (and in the parsed setting)


def read_api_key(key: str, key_file: str) -> str:
    """The keys from `--api-key` (comma-separated) or the file `--api-key-file` names (one
    per line; blank lines and # comments skipped), as one comma-separated string with the
    whitespace around each key removed; "" when neither is set."""
    if key and key_file:
        raise APIKeyError("give --api-key or --api-key-file, not both")
    if key_file:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise APIKeyError(f"cannot read the API key file {key_file}: {exc}") from None
        lines = [line.strip() for line in text.splitlines()]
        keys = [line for line in lines if line and not line.startswith("#")]
        if not keys:
            raise APIKeyError(f"the API key file {key_file} is empty")
        if any(KEY_SEPARATOR in line for line in keys):
            raise APIKeyError(f"an API key in {key_file} contains {KEY_SEPARATOR!r}")
    else:
        keys = [part.strip() for part in key.split(KEY_SEPARATOR)] if key.strip() else []
        if any(not part for part in keys):
            raise APIKeyError("--api-key has an empty key between commas")
    if any(not part.isprintable() for part in keys):
        raise APIKeyError("an API key must be printable text")
    return KEY_SEPARATOR.join(dict.fromkeys(keys))


def api_keys(setting: str) -> tuple[str, ...]:
    """The keys of the parsed `api_key` setting (read_api_key's form); () = no key."""
    return tuple(part for part in setting.split(KEY_SEPARATOR) if part)


def auth_middleware(keys: tuple[str, ...], exempt: frozenset[Auth]) -> Any:
    """`keys`: those accepted; `exempt`: the route policies answered without a key
    (routes.exempt_from_key)."""
    expected = [(key.encode("utf-8"), tenant_of(key)) for key in keys]

    @web.middleware
    async def require_api_key(request: web.Request, handler: Any) -> web.StreamResponse:
        route = route_of(request)
        if route is not None and route.auth in exempt and request.method in _READ_METHODS:
            return await handler(request)
        if route is not None and route.auth is Auth.ADMIN:  # admin_middleware's
            return await handler(request)
        token, well_formed = _presented_key(request, route)
        presented = token.strip().encode("utf-8", "replace")
        # Every key is compared, and compare_digest comes first, so the time taken says
        # neither which key nor which check failed.
        tenant = None
        for key, key_tenant in expected:
            if hmac.compare_digest(presented, key):
                tenant = key_tenant
        if tenant is None or not well_formed:
            raise INVALID_API_KEY()
        request[TENANT_KEY] = tenant
        return await handler(request)

    return require_api_key


def admin_middleware(admin_key: str) -> Any:
    """The admin key on `Auth.ADMIN` routes, as a Bearer token; other routes pass through."""
    expected = admin_key.encode("utf-8")

    @web.middleware
    async def require_admin_key(request: web.Request, handler: Any) -> web.StreamResponse:
        route = route_of(request)
        if route is None or route.auth is not Auth.ADMIN:
            return await handler(request)
        token, well_formed = _presented_key(request, route)
        presented = token.strip().encode("utf-8", "replace")
        if not (hmac.compare_digest(presented, expected) and well_formed):
            raise INVALID_API_KEY()
        return await handler(request)

    return require_admin_key


def _presented_key(request: web.Request, route: Route | None) -> tuple[str, bool]:
    """The key the request presents, and whether it came in a form its route takes."""
    if route is not None and route.auth is Auth.X_API_KEY and X_API_KEY in request.headers:
        return request.headers[X_API_KEY], True
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token, scheme.lower() == "bearer"
