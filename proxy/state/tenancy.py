"""Whose stored objects a request may see.

Every stored row carries a tenant: a SHA-256 of the API key the caller presented, never the
key itself (a database dump must not hand out keys). Another key's objects answer 404 exactly
like unknown ids, so ids cannot be probed across tenants. Without configured keys everyone is
the one anonymous tenant.

The API-key middleware (proxy/serving/auth.py) puts the tenant of the key a request presented
on the request; `request_tenant` reads it.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

ANONYMOUS = "anonymous"
TENANT_KEY = web.RequestKey("tenant", str)


def tenant_of(api_key: str | None) -> str:
    if not api_key:
        return ANONYMOUS
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def request_tenant(request: web.Request) -> str:
    """The tenant whose objects `request` may see: its key's, or the anonymous tenant when
    the proxy has no keys."""
    return request.get(TENANT_KEY, ANONYMOUS)
