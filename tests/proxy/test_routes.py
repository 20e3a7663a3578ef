"""The route table (proxy/app.py ROUTES): every route the app serves comes from it, every
POST route is admitted (generating, or changing stored state: an upload or a write), and each
route's metrics label is aiohttp's template.

The per-route load tests (429 above the cap, 503 while draining, 408 for a slow body, the
deadline) are in tests/proxy/test_hardening_backpressure.py, one per GENERATING_REQUESTS key.
"""

from __future__ import annotations

import re

from aiohttp import web
from hardening_helpers import GENERATING_REQUESTS, assert_route_envelope
from proxy_fakes import TEST_CONFIG, FakeBackend, serving_app

from proxy.app import create_app
from proxy.serving.admission import ADMISSION_KEY
from proxy.serving.routes import ROUTES_KEY, Admit, Route

# POST routes that are not admitted at all: none today. A new one is a decision to write
# down here, not something a route gets by being forgotten.
NOT_GENERATING_POSTS: frozenset[str] = frozenset()
# The policies of an admitted POST route: each refuses new requests while draining and
# bounds how long its body may take (proxy/serving/routes.py).
ADMITTED = frozenset({Admit.GENERATING, Admit.UPLOAD, Admit.WRITE})


def app_routes(app: web.Application) -> list[tuple[str, str]]:
    return [(route.method, route.resource.canonical) for route in app.router.routes()]


def policy_faults(app: web.Application) -> list[str]:
    """What is wrong with `app`'s routes: one added outside the table, a POST route that is
    not admitted."""
    table = app[ROUTES_KEY]
    faults = []
    for route in app.router.routes():
        name = f"{route.method} {route.resource.canonical}"
        entry = table.get(route)
        if entry is None:
            faults.append(f"{name}: registered outside the route table")
        elif route.method == "POST" and entry.admit not in ADMITTED:
            if entry.label not in NOT_GENERATING_POSTS:
                faults.append(f"{name}: a POST route that is not admitted")
    return faults


def proxy_app() -> web.Application:
    return create_app(TEST_CONFIG, FakeBackend())


def test_every_route_comes_from_the_table_and_every_post_route_is_admitted():
    assert policy_faults(proxy_app()) == []


def test_a_route_added_outside_the_table_or_not_admitted_is_found():
    app = proxy_app()

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_post("/v1/extra", handler)
    assert policy_faults(app) == ["POST /v1/extra: registered outside the route table"]
    table = app[ROUTES_KEY]
    chat = next(r for r in app.router.routes() if r.resource.canonical == "/v1/chat/completions")
    table[chat] = Route("POST", "/v1/chat/completions", handler)  # admit left out
    assert "POST /v1/chat/completions: a POST route that is not admitted" in policy_faults(app)


def test_the_generating_routes_are_exactly_the_tested_ones():
    generating = {
        entry.label for entry in proxy_app()[ROUTES_KEY].values() if entry.admit is Admit.GENERATING
    }
    assert generating == set(GENERATING_REQUESTS)


def test_each_routes_metrics_label_is_aiohttps_template():
    app = proxy_app()
    for route, entry in app[ROUTES_KEY].items():
        assert entry.label == route.resource.canonical


async def test_every_post_route_answers_503_while_draining():
    """Behaviour, not the table: whatever a POST route declares, a draining proxy refuses it."""
    app = proxy_app()
    posts = [path for method, path in app_routes(app) if method == "POST"]
    assert posts  # the chat and Responses routes at least
    async with serving_app(app) as client:
        app[ADMISSION_KEY].draining = True
        for path in posts:
            response = await client.post(re.sub(r"\{[^}]*\}", "x", path), json={})
            assert response.status == 503, path
            assert_route_envelope(path, await response.json(), "server_shutting_down")
