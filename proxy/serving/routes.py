"""What a route is: its method, path, handler and serving policy, declared in one place.

Every route the proxy serves is a `Route` in the table of proxy/app.py, and `register_routes`
is the only thing that adds routes to the app. The middlewares read their decisions from the
route aiohttp matched (`route_of`), never from path strings:

- `admit` (proxy/serving/admission.py): GENERATING routes are admitted: the in-flight cap
  (429), the body read within `--request-body-timeout-s` (408), 503 while draining, the
  request deadline, and shutdown waits for them; READINESS routes answer 503 while draining,
  so a load balancer stops routing here; NONE routes are answered as they are.
  Routes that change stored state without generating (proxy/state/) are admitted too, but
  take no in-flight slot (they hold no model slot, and a flood of them must not starve
  generation): WRITE routes (a small JSON body or none: create a batch, cancel, delete) get
  the body timeout and 503 while draining; UPLOAD routes (POST /v1/files) get 503 while
  draining and bound their own body: the handler streams it to storage within its own size
  limit (--file-max-bytes, not --max-request-bytes), each read within
  --request-body-timeout-s, so a large upload may take long but never stall.
- `auth` (proxy/serving/auth.py): KEY needs the API key when one is configured, as a Bearer
  token; X_API_KEY the same key, also taken from `x-api-key` (Anthropic's header); PROBE
  never does (GET/HEAD only); SCRAPE does only with `--metrics-require-auth`; PAGE never
  does (GET/HEAD only): the playground's static files, which hold no data, as a browser
  navigating to a page cannot send the key (proxy/playground/routes.py); ADMIN needs the admin
  key (--admin-api-key) as a Bearer token, and no client key opens it.
- `error_body` (proxy/errors.py): how the route's API writes an error: OpenAI's envelope by
  default, Anthropic's on /v1/messages. Every error of the route is written so, whichever
  middleware or handler raised it (the 401, 429, 408 and 503s of auth and admission included).
- `in_flight_gauge` (proxy/observability/observe.py): whether the route counts in the
  in-flight gauge (a scrape of /metrics would always see itself).
- `label`: the metrics `route` label, the path template without its patterns.
- `traced`: whether its requests get an OpenTelemetry span (proxy/observability/tracing.py):
  the GENERATING routes, so a new generating route is traced by being declared one.

A request aiohttp could not route (404, 405) has no `Route`: it needs the key, is not
admitted and is labelled `unmatched`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web import AbstractRoute

from ..error_catalogue import APIError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How an API surface writes an error: (the error, the request id) -> the JSON body.
ErrorBody = Callable[[APIError, str], dict[str, Any]]

# `{model:.+}` -> `{model}`: what aiohttp's canonical template says too.
_PATTERN = re.compile(r"\{([^:{}]+):[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


class Admit(enum.Enum):
    GENERATING = "generating"
    UPLOAD = "upload"
    WRITE = "write"
    READINESS = "readiness"
    NONE = "none"


class Auth(enum.Enum):
    KEY = "key"
    X_API_KEY = "x-api-key"  # the key as `x-api-key` when sent, else as a Bearer token
    PROBE = "probe"
    SCRAPE = "scrape"
    PAGE = "page"  # a static file of the browser playground: no data, no key
    ADMIN = "admin"  # the admin key only (LoRA load/unload): what every client is served


def openai_error_body(error: APIError, request_id: str) -> dict[str, Any]:
    """OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`."""
    return error.envelope()


@dataclass(frozen=True)
class Route:
    method: str  # "GET" (HEAD is answered too), "POST" or "DELETE"
    path: str  # aiohttp's template: `/v1/models/{model:.+}`
    handler: Handler
    admit: Admit = Admit.NONE
    auth: Auth = Auth.KEY
    error_body: ErrorBody = openai_error_body
    in_flight_gauge: bool = True

    @property
    def label(self) -> str:
        return _PATTERN.sub(r"{\1}", self.path)

    @property
    def traced(self) -> bool:
        return self.admit is Admit.GENERATING


ROUTES_KEY = web.AppKey("routes", dict)  # aiohttp's route object -> its Route


def register_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Adds `routes` to `app`, each aiohttp route remembered with the `Route` it came from."""
    table: dict[AbstractRoute, Route] = app.setdefault(ROUTES_KEY, {})
    for route in routes:
        methods = (route.method, "HEAD") if route.method == "GET" else (route.method,)
        for method in methods:
            table[app.router.add_route(method, route.path, route.handler)] = route


def route_of(request: web.Request) -> Route | None:
    """The `Route` of what aiohttp matched; None when nothing matched (404, 405) or for a
    route added outside `register_routes`."""
    routes: Mapping[AbstractRoute, Route] = request.app.get(ROUTES_KEY, {})
    return routes.get(request.match_info.route)


def exempt_from_key(metrics_require_auth: bool) -> frozenset[Auth]:
    """The `auth` policies answered without the API key (GET and HEAD only)."""
    always = {Auth.PROBE, Auth.PAGE}
    return frozenset(always if metrics_require_auth else always | {Auth.SCRAPE})


def _key_shown(auth: Auth) -> str:
    if auth is Auth.ADMIN:
        return "admin key"
    return "API key (Bearer or x-api-key)" if auth is Auth.X_API_KEY else "API key"


def describe_routes(routes: Iterable[Route], *, api_key: bool, metrics_require_auth: bool) -> str:
    """One block for the startup log: every route and its policy (`api_key`: one is set)."""
    exempt = exempt_from_key(metrics_require_auth)
    admit = {
        Admit.GENERATING: "admitted (in-flight cap, body timeout, deadline, drained)",
        Admit.UPLOAD: "upload (its own size limit, each read timed, 503 while draining)",
        Admit.WRITE: "write (body timeout, 503 while draining)",
        Admit.READINESS: "503 while draining",
        Admit.NONE: "",
    }
    lines = ["routes:"]
    for route in routes:
        auth = ("no key" if route.auth in exempt else _key_shown(route.auth)) if api_key else ""
        if route.auth is Auth.ADMIN:
            auth = _key_shown(route.auth)
        policy = ", ".join(part for part in (admit[route.admit], auth) if part)
        lines.append(f"  {route.method:<5} {route.label:<24} {policy}".rstrip())
    return "\n".join(lines)
