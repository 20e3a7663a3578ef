"""Whose stored objects a request may see.

Every stored row carries a tenant: a SHA-256 of the API key the caller presented, never the
key itself (a database dump must not hand out keys). Another key's objects answer 404 exactly
like unknown ids, so ids cannot be probed across tenants. Without configured keys everyone is
the one anonymous tenant.
"""

from __future__ import annotations

import hashlib

ANONYMOUS = "anonymous"


def tenant_of(api_key: str | None) -> str:
    if not api_key:
        return ANONYMOUS
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()
