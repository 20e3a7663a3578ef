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

from ..config import ProxyConfig
from .admission import install_admission
from .auth import auth_middleware
from .routes import exempt_from_key


def install_hardening(app: web.Application, config: ProxyConfig) -> None:
    """Adds the API-key and admission middlewares (inside the error middleware, so their
    refusals are envelopes)."""
    server = config.server
    if server.api_key:
        app.middlewares.append(
            auth_middleware(server.api_key, exempt_from_key(server.metrics_require_auth))
        )
    install_admission(app, config.admission)


def describe_limits(config: ProxyConfig) -> str:
    """One block for the startup log: every limit in force."""
    mib = 1024 * 1024
    server, admission, limits, pixels = (
        config.server,
        config.admission,
        config.limits,
        config.pixels,
    )
    # Which routes need it: the route list logged beside this (proxy/serving/routes.py).
    api_key = "required" if server.api_key else "not required"
    lines = [
        'limits ("model\'s": what the model allows, asked at the first request):',
        f"  request body          {admission.max_request_bytes / mib:g} MiB, received within "
        f"{admission.request_body_timeout_s:g} s",
        f"  messages              {limits.max_messages} per request, "
        f"{limits.max_text_chars} text characters",
        f"  images                {_own(limits.max_images)} per request, "
        f"{limits.max_image_bytes / mib:g} MiB and {_own(limits.max_image_source_pixels)} "
        f"pixels each, {limits.max_request_pixels} pixels in all",
        f"  image shape           sides >= {limits.min_image_side} px, aspect ratio <= "
        f"{_own(limits.max_image_aspect_ratio)}, resized into [{_own(pixels.min_pixels)}, "
        f"{_own(pixels.max_pixels)}] pixels",
        f"  max_tokens            {_own(server.max_tokens_limit)}",
        f"  in flight             {admission.max_concurrent_requests} generating requests (then 429)",
        f"  timeouts              {admission.request_timeout_s:g} s per request, "
        f"{admission.stream_idle_timeout_s:g} s between model responses",
        f"  shutdown              {server.shutdown_timeout_s:g} s for in-flight requests",
        f"  API key               {api_key}",
    ]
    return "\n".join(lines)


def _own(value: float) -> str:
    """A flag that narrows the model's limit: its value, or the model's when it is 0."""
    return f"{value:g}" if value > 0 else "model's"
