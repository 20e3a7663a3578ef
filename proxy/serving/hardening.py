"""Wires the hardening pieces into the app and describes them at startup.

    proxy/serving/routes.py     each route's policy (admitted or not, API key or not), read by both
    proxy/serving/auth.py       optional API key (outermost of these: refused before anything else)
    proxy/serving/admission.py  in-flight cap (429), body size and time, deadlines, draining
    proxy/request/limits.py     request and image limits, checked by the chat handler
    proxy/serving/shutdown.py   SIGTERM -> drain -> exit (installed by proxy/__main__.py)

docs/security.md has the defaults table and a deployment recipe.
"""

from __future__ import annotations

from aiohttp import web

from ..config import SETTINGS, ProxyConfig
from .admission import install_admission
from .auth import admin_middleware, api_keys, auth_middleware
from .routes import exempt_from_key


def install_hardening(app: web.Application, config: ProxyConfig) -> None:
    """Adds the API-key and admission middlewares (inside the error middleware, so their
    refusals are envelopes)."""
    server = config.server
    if server.admin_api_key:
        app.middlewares.append(admin_middleware(server.admin_api_key))
    if server.api_key:
        app.middlewares.append(
            auth_middleware(api_keys(server.api_key), exempt_from_key(server.metrics_require_auth))
        )
    install_admission(app, config.admission)


# The settings sections that bound what a request may cost; the server section's limits are
# its rows that narrow a model limit, and the shutdown grace.
_LIMIT_SECTIONS = ("admission", "limits", "pixels", "fetch")
_SERVER_LIMITS = ("shutdown_timeout_s",)


def describe_limits(config: ProxyConfig) -> str:
    """One block for the startup log: every limit in force, derived from the flag table
    (proxy/config.py SETTINGS), so a new limit flag shows here without an edit."""
    rows = [
        row
        for row in SETTINGS
        if row.section in _LIMIT_SECTIONS
        or (row.section == "server" and (row.narrows_model or row.name in _SERVER_LIMITS))
    ]
    width = max(len(row.option) for row in rows)
    lines = ["limits in force (\"model's\": the model's own, asked at the first request):"]
    for row in rows:
        value = getattr(getattr(config, row.section), row.name)
        lines.append(f"  {row.option:<{width}}  {_shown(value, row.narrows_model)}")
    keys = len(api_keys(config.server.api_key))
    api_key = f"required ({keys} {'key' if keys == 1 else 'keys'})" if keys else "not required"
    lines.append(f"  API key: {api_key} (which routes: the route table logged beside this)")
    admin = "required (LoRA load/unload served)" if config.server.admin_api_key else "not set"
    lines.append(f"  admin key: {admin}")
    return "\n".join(lines)


def _shown(value: object, narrows_model: bool) -> str:
    if narrows_model and value == 0:
        return "model's"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
