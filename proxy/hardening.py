"""Wires the hardening pieces into the app and describes them at startup.

    proxy/auth.py       optional API key (outermost of these: refused before anything else)
    proxy/admission.py  in-flight cap (429), body size and time, deadlines, draining
    proxy/limits.py     request and image limits, checked by the chat handler
    proxy/shutdown.py   SIGTERM -> drain -> exit (installed by proxy/__main__.py)

docs/security.md has the defaults table and a deployment recipe.
"""

from __future__ import annotations

from aiohttp import web

from .admission import AdmissionSettings, install_admission
from .auth import auth_middleware, exempt_routes
from .config import ProxyConfig
from .limits import RequestLimits

REQUEST_LIMITS_KEY = web.AppKey("request_limits", RequestLimits)


def request_limits(config: ProxyConfig) -> RequestLimits:
    return RequestLimits(
        max_messages=config.max_messages,
        max_text_chars=config.max_text_chars,
        max_images=config.max_images,
        max_image_bytes=config.max_image_bytes,
        max_image_pixels=config.max_image_source_pixels,
        min_image_side=config.min_image_side,
        max_aspect_ratio=config.max_image_aspect_ratio,
        max_request_pixels=config.max_request_pixels,
    )


def admission_settings(config: ProxyConfig) -> AdmissionSettings:
    return AdmissionSettings(
        max_in_flight=config.max_concurrent_requests,
        max_body_bytes=config.max_request_bytes,
        body_timeout_s=config.request_body_timeout_s,
        request_timeout_s=config.request_timeout_s,
        idle_timeout_s=config.stream_idle_timeout_s,
    )


def install_hardening(app: web.Application, config: ProxyConfig) -> None:
    """Adds the API-key and admission middlewares (inside the error middleware, so their
    refusals are envelopes) and the request limits the chat handler checks."""
    app[REQUEST_LIMITS_KEY] = request_limits(config)
    if config.api_key:
        app.middlewares.append(
            auth_middleware(config.api_key, exempt_routes(config.metrics_require_auth))
        )
    install_admission(app, admission_settings(config))


def describe_limits(config: ProxyConfig) -> str:
    """One block for the startup log: every limit in force."""
    mib = 1024 * 1024
    api_key = "not required"
    if config.api_key:
        metrics = "too" if config.metrics_require_auth else "exempt"
        api_key = f"required on every route but /health and /ready (/metrics {metrics})"
    lines = [
        "limits:",
        f"  request body          {config.max_request_bytes / mib:g} MiB, received within "
        f"{config.request_body_timeout_s:g} s",
        f"  messages              {config.max_messages} per request, "
        f"{config.max_text_chars} text characters",
        f"  images                {config.max_images} per request, "
        f"{config.max_image_bytes / mib:g} MiB and {config.max_image_source_pixels} pixels "
        f"each, {config.max_request_pixels} pixels in all",
        f"  image shape           sides >= {config.min_image_side} px, aspect ratio <= "
        f"{config.max_image_aspect_ratio:g}:1, resized into [{config.image_min_pixels}, "
        f"{config.image_max_pixels}] pixels",
        f"  max_tokens            {config.max_tokens_limit or 'no proxy limit'}",
        f"  in flight             {config.max_concurrent_requests} chat completions (then 429)",
        f"  timeouts              {config.request_timeout_s:g} s per request, "
        f"{config.stream_idle_timeout_s:g} s between model responses",
        f"  shutdown              {config.shutdown_timeout_s:g} s for in-flight requests",
        f"  API key               {api_key}",
    ]
    return "\n".join(lines)
