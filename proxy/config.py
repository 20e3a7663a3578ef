"""Proxy settings: command-line flags, each with an environment-variable fallback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .admission import AdmissionSettings
from .auth import APIKeyError, read_api_key
from .fetch import FetchPolicy
from .limits import RequestLimits
from .logs import log_format
from .pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

# Each component's settings class holds its defaults; the flags start from them.
_LIMITS = RequestLimits()
_ADMISSION = AdmissionSettings()
_FETCH = FetchPolicy()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "0.0.0.0"
    port: int = 9000
    triton_url: str = "localhost:8001"
    triton_model: str = "qwen2_5_vl"
    served_model_name: str = "qwen2.5-vl-7b-instruct"
    # Extra served names, each mapped to a Triton model: ((name, triton_model), ...).
    model_map: tuple[tuple[str, str], ...] = ()
    max_request_bytes: int = _ADMISSION.max_body_bytes
    # Hardening (proxy/limits.py, proxy/admission.py, proxy/auth.py, proxy/shutdown.py).
    request_body_timeout_s: float = _ADMISSION.body_timeout_s
    max_messages: int = _LIMITS.max_messages
    max_text_chars: int = _LIMITS.max_text_chars
    max_images: int = _LIMITS.max_images
    max_image_bytes: int = _LIMITS.max_image_bytes
    max_image_source_pixels: int = _LIMITS.max_image_pixels
    min_image_side: int = _LIMITS.min_image_side
    max_image_aspect_ratio: float = _LIMITS.max_aspect_ratio
    max_request_pixels: int = _LIMITS.max_request_pixels
    max_concurrent_requests: int = _ADMISSION.max_in_flight
    request_timeout_s: float = _ADMISSION.request_timeout_s
    stream_idle_timeout_s: float = _ADMISSION.idle_timeout_s
    shutdown_timeout_s: float = 30.0
    api_key: str = field(default="", repr=False)  # "" = no key required
    max_tokens_limit: int = 8192
    image_min_pixels: int = DEFAULT_MIN_PIXELS
    image_max_pixels: int = DEFAULT_MAX_PIXELS
    image_fetch: bool = True
    image_fetch_allowed_domains: tuple[str, ...] = _FETCH.allowed_domains
    image_fetch_allow_private_hosts: tuple[str, ...] = _FETCH.allow_private_hosts
    image_fetch_max_bytes: int = _FETCH.max_bytes
    image_fetch_connect_timeout_s: float = _FETCH.connect_timeout_s
    image_fetch_timeout_s: float = _FETCH.timeout_s
    image_fetch_concurrency: int = _FETCH.concurrency
    lazy_load: bool = False
    load_timeout_s: float = 600.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_require_auth: bool = False

    @property
    def served_models(self) -> dict[str, str]:
        """Served name -> Triton model, the default (`--served-model-name`) first."""
        return {self.served_model_name: self.triton_model, **dict(self.model_map)}


def _env(name: str, default: object) -> str:
    # A string default goes through the flag's `type`, so a bad env value gets argparse's error.
    if isinstance(default, bool):
        default = "true" if default else "false"
    elif isinstance(default, tuple):
        default = ",".join(default)
    return os.environ.get(name, str(default))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of host or domain names, normalised for comparison."""
    names = (item.strip().lower().strip("[]").rstrip(".") for item in text.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def _domains(text: str) -> tuple[str, ...]:
    # `*.example.com` and `.example.com` both mean "example.com and its subdomains".
    return tuple(dict.fromkeys(name.removeprefix("*.").lstrip(".") for name in _names(text)))


def _model_map(text: str) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    for item in filter(None, (entry.strip() for entry in text.split(","))):
        name, sep, model = (part.strip() for part in item.partition("="))
        if not sep or not name or not model:
            raise argparse.ArgumentTypeError(f"expected name=triton_model, got {item!r}")
        if name in pairs:
            raise argparse.ArgumentTypeError(f"served name {name!r} is mapped twice")
        pairs[name] = model
    return tuple(pairs.items())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = ProxyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="OpenAI-compatible chat completions API backed by Triton (gRPC streaming).",
    )
    parser.add_argument(
        "--host",
        default=_env("PROXY_HOST", defaults.host),
        help="interface to listen on; use 127.0.0.1 to keep the API off the network [PROXY_HOST]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env("PROXY_PORT", defaults.port),
        help="HTTP port; 9000 matches Triton's own OpenAI frontend [PROXY_PORT]",
    )
    parser.add_argument(
        "--triton-url",
        default=_env("TRITON_GRPC_URL", defaults.triton_url),
        help="Triton gRPC endpoint host:port; inference streams over gRPC [TRITON_GRPC_URL]",
    )
    parser.add_argument(
        "--triton-model",
        default=_env("TRITON_MODEL", defaults.triton_model),
        help="Triton model behind --served-model-name [TRITON_MODEL]",
    )
    parser.add_argument(
        "--served-model-name",
        default=_env("SERVED_MODEL_NAME", defaults.served_model_name),
        help="default `model`: what requests without one get and responses echo "
        "[SERVED_MODEL_NAME]",
    )
    parser.add_argument(
        "--model-map",
        type=_model_map,
        default=_env("PROXY_MODEL_MAP", defaults.model_map),
        help="more served names as name=triton_model,...: aliases or other Triton models "
        "clients can pick with `model` [PROXY_MODEL_MAP]",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=_env("PROXY_MAX_REQUEST_BYTES", defaults.max_request_bytes),
        help="largest accepted request body; base64 images outgrow aiohttp's 1 MiB default "
        "[PROXY_MAX_REQUEST_BYTES]",
    )
    _add_hardening_arguments(parser, defaults)
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=_env("PROXY_MAX_TOKENS_LIMIT", defaults.max_tokens_limit),
        help="larger max_tokens/max_completion_tokens are clamped to this, so one request "
        "cannot hold a model slot for long (the model's max_tokens_cap); 0 = no proxy limit "
        "[PROXY_MAX_TOKENS_LIMIT]",
    )
    parser.add_argument(
        "--image-min-pixels",
        type=_positive_int,
        default=_env("PROXY_IMAGE_MIN_PIXELS", defaults.image_min_pixels),
        help="smallest area an image is resized to (28x28 px = 1 visual token); the model's "
        "own default, and the floor for a request's min_pixels [PROXY_IMAGE_MIN_PIXELS]",
    )
    parser.add_argument(
        "--image-max-pixels",
        type=_positive_int,
        default=_env("PROXY_IMAGE_MAX_PIXELS", defaults.image_max_pixels),
        help="largest area an image is resized to (1003520 = 1280 visual tokens, the model's "
        "default); bounds memory and prefill time per image, and caps a request's max_pixels "
        "[PROXY_IMAGE_MAX_PIXELS]",
    )
    fetch = parser.add_mutually_exclusive_group()
    fetch.add_argument(
        "--image-fetch",
        type=_bool,
        nargs="?",
        const=True,
        default=_env("PROXY_IMAGE_FETCH", defaults.image_fetch),
        help="fetch http(s) image URLs (guarded against private addresses); false keeps the "
        "proxy off the network and accepts only data: URLs [PROXY_IMAGE_FETCH]",
    )
    fetch.add_argument(
        "--no-image-fetch",
        dest="image_fetch",
        action="store_false",
        help="same as --image-fetch=false",
    )
    parser.add_argument(
        "--image-fetch-allowed-domains",
        type=_domains,
        default=_env("PROXY_IMAGE_FETCH_ALLOWED_DOMAINS", defaults.image_fetch_allowed_domains),
        help="comma-separated domains image URLs must be on (a domain covers its subdomains); "
        "empty = any public host [PROXY_IMAGE_FETCH_ALLOWED_DOMAINS]",
    )
    parser.add_argument(
        "--image-fetch-allow-private-hosts",
        type=_names,
        default=_env(
            "PROXY_IMAGE_FETCH_ALLOW_PRIVATE_HOSTS", defaults.image_fetch_allow_private_hosts
        ),
        help="FOR TESTS ONLY: URL hosts (e.g. 127.0.0.1,localhost) exempt from the "
        "public-address rule, so tests can serve images locally; never set in production "
        "[PROXY_IMAGE_FETCH_ALLOW_PRIVATE_HOSTS]",
    )
    parser.add_argument(
        "--image-fetch-max-bytes",
        type=_positive_int,
        default=_env("PROXY_IMAGE_FETCH_MAX_BYTES", defaults.image_fetch_max_bytes),
        help="largest image body fetched (enforced while reading), so a huge or endless "
        "response cannot exhaust memory [PROXY_IMAGE_FETCH_MAX_BYTES]",
    )
    parser.add_argument(
        "--image-fetch-connect-timeout-s",
        type=_positive_float,
        default=_env("PROXY_IMAGE_FETCH_CONNECT_TIMEOUT_S", defaults.image_fetch_connect_timeout_s),
        help="seconds to connect to an image host; unreachable hosts fail fast "
        "[PROXY_IMAGE_FETCH_CONNECT_TIMEOUT_S]",
    )
    parser.add_argument(
        "--image-fetch-timeout-s",
        type=_positive_float,
        default=_env("PROXY_IMAGE_FETCH_TIMEOUT_S", defaults.image_fetch_timeout_s),
        help="seconds for one image fetch in all (DNS, redirects, body), so a slow server "
        "cannot hold a request [PROXY_IMAGE_FETCH_TIMEOUT_S]",
    )
    parser.add_argument(
        "--image-fetch-concurrency",
        type=_positive_int,
        default=_env("PROXY_IMAGE_FETCH_CONCURRENCY", defaults.image_fetch_concurrency),
        help="image URLs of one request fetched at the same time; bounds what one request "
        "can make the proxy open [PROXY_IMAGE_FETCH_CONCURRENCY]",
    )
    parser.add_argument(
        "--lazy-load",
        type=_bool,
        nargs="?",
        const=True,
        default=_env("PROXY_LAZY_LOAD", defaults.lazy_load),
        help="the first chat request loads the model (Triton started with "
        "--model-control-mode=explicit), as the original server did; saves memory until "
        "used [PROXY_LAZY_LOAD]",
    )
    parser.add_argument(
        "--load-timeout-s",
        type=_positive_float,
        default=_env("PROXY_LOAD_TIMEOUT_S", defaults.load_timeout_s),
        help="with --lazy-load, how long a request waits for the model to load before a 503 "
        "(the load goes on; a later request can wait again) [PROXY_LOAD_TIMEOUT_S]",
    )
    parser.add_argument(
        "--log-level",
        default=_env("PROXY_LOG_LEVEL", defaults.log_level),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="verbosity of the proxy's logs (one line per request at INFO) [PROXY_LOG_LEVEL]",
    )
    parser.add_argument(
        "--log-format",
        type=log_format,
        metavar="{text,json}",
        default=_env("PROXY_LOG_FORMAT", defaults.log_format),
        help="text for people; json (one object per line, request fields as keys) for log "
        "pipelines that index fields such as request_id [PROXY_LOG_FORMAT]",
    )
    parser.add_argument(
        "--metrics-require-auth",
        type=_bool,
        nargs="?",
        const=True,
        default=_env("PROXY_METRICS_REQUIRE_AUTH", defaults.metrics_require_auth),
        help="make GET /metrics need the API key like the API does; off by default because "
        "Prometheus scrapers rarely carry one (keep the port off untrusted networks instead) "
        "[PROXY_METRICS_REQUIRE_AUTH]",
    )
    return parser


def _add_hardening_arguments(parser: argparse.ArgumentParser, defaults: ProxyConfig) -> None:
    """Limits, backpressure, timeouts, shutdown and the API key (docs/security.md)."""
    parser.add_argument(
        "--request-body-timeout-s",
        type=_positive_float,
        default=_env("PROXY_REQUEST_BODY_TIMEOUT_S", defaults.request_body_timeout_s),
        help="seconds to receive a request body (408 after), so a client that trickles its "
        "body cannot hold an in-flight slot [PROXY_REQUEST_BODY_TIMEOUT_S]",
    )
    parser.add_argument(
        "--max-messages",
        type=_positive_int,
        default=_env("PROXY_MAX_MESSAGES", defaults.max_messages),
        help="messages per request; bounds validation and chat-template work per request "
        "[PROXY_MAX_MESSAGES]",
    )
    parser.add_argument(
        "--max-text-chars",
        type=_positive_int,
        default=_env("PROXY_MAX_TEXT_CHARS", defaults.max_text_chars),
        help="characters of text per request, all messages together; bounds tokenizer work "
        "and is above what a 128k-token context holds [PROXY_MAX_TEXT_CHARS]",
    )
    parser.add_argument(
        "--max-images",
        type=_positive_int,
        default=_env("PROXY_MAX_IMAGES", defaults.max_images),
        help="images per request; the model's max_images (16), refused here before any "
        "image is fetched or decoded [PROXY_MAX_IMAGES]",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=_positive_int,
        default=_env("PROXY_MAX_IMAGE_BYTES", defaults.max_image_bytes),
        help="encoded bytes per image (after base64 decoding); bounds memory per image "
        "[PROXY_MAX_IMAGE_BYTES]",
    )
    parser.add_argument(
        "--max-image-source-pixels",
        type=_positive_int,
        default=_env("PROXY_MAX_IMAGE_SOURCE_PIXELS", defaults.max_image_source_pixels),
        help="width x height per image, read from its header before anything decodes it "
        "(decompression bombs); the model's max_source_pixels, 40 MP = 120 MB of RGB "
        "[PROXY_MAX_IMAGE_SOURCE_PIXELS]",
    )
    parser.add_argument(
        "--min-image-side",
        type=_positive_int,
        default=_env("PROXY_MIN_IMAGE_SIDE", defaults.min_image_side),
        help="smallest width or height accepted; 1 accepts any image (the model upscales "
        "tiny ones onto its 28-px grid), raise it to refuse images with no content "
        "[PROXY_MIN_IMAGE_SIDE]",
    )
    parser.add_argument(
        "--max-image-aspect-ratio",
        type=_positive_float,
        default=_env("PROXY_MAX_IMAGE_ASPECT_RATIO", defaults.max_image_aspect_ratio),
        help="longest over shortest side; Qwen's resize (and the model) refuse beyond 200 "
        "[PROXY_MAX_IMAGE_ASPECT_RATIO]",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=_positive_int,
        default=_env("PROXY_MAX_REQUEST_PIXELS", defaults.max_request_pixels),
        help="source pixels of all images of a request together: the model decodes them all "
        "at full size before resizing (200 MP = 600 MB of RGB; 16 12-MP photos fit) "
        "[PROXY_MAX_REQUEST_PIXELS]",
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=_positive_int,
        default=_env("PROXY_MAX_CONCURRENT_REQUESTS", defaults.max_concurrent_requests),
        help="chat completions in flight; more get 429 at once (before their body is read), "
        "bounding memory; below the model's batch + queue (16 + 64) so its queue never "
        "overflows [PROXY_MAX_CONCURRENT_REQUESTS]",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=_positive_float,
        default=_env("PROXY_REQUEST_TIMEOUT_S", defaults.request_timeout_s),
        help="total deadline of a chat completion, body to last token (504, or an SSE error "
        "once streaming); 8192 tokens of a 7B take minutes [PROXY_REQUEST_TIMEOUT_S]",
    )
    parser.add_argument(
        "--stream-idle-timeout-s",
        type=_positive_float,
        default=_env("PROXY_STREAM_IDLE_TIMEOUT_S", defaults.stream_idle_timeout_s),
        help="longest silence of the Triton stream between two responses (after the first, "
        "which waits for queueing and prefill), so a hung backend is noticed "
        "[PROXY_STREAM_IDLE_TIMEOUT_S]",
    )
    parser.add_argument(
        "--shutdown-timeout-s",
        type=_positive_float,
        default=_env("PROXY_SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s),
        help="on SIGTERM, how long in-flight requests may finish before they are cancelled; "
        "keep it at tritonserver's --exit-timeout-secs (30) [PROXY_SHUTDOWN_TIMEOUT_S]",
    )
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        default=os.environ.get("PROXY_API_KEY", ""),
        help="require 'Authorization: Bearer <key>' on every route but /health and /ready; "
        "empty = no key (prefer --api-key-file: flags show up in ps) [PROXY_API_KEY]",
    )
    key.add_argument(
        "--api-key-file",
        default=os.environ.get("PROXY_API_KEY_FILE", ""),
        help="file holding the API key (a mounted secret); its surrounding whitespace is "
        "ignored [PROXY_API_KEY_FILE]",
    )


def parse_config(argv: Sequence[str] | None = None) -> ProxyConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_image_aspect_ratio < 1:
        parser.error("--max-image-aspect-ratio must be at least 1")
    try:
        api_key = read_api_key(args.api_key, args.api_key_file)
    except APIKeyError as exc:
        parser.error(str(exc))
    if args.max_tokens_limit < 0:
        parser.error("--max-tokens-limit must be 0 (no limit) or positive")
    if args.image_min_pixels > args.image_max_pixels:
        parser.error("--image-min-pixels must not exceed --image-max-pixels")
    if args.served_model_name in dict(args.model_map):
        parser.error("--model-map must not remap --served-model-name")
    return ProxyConfig(
        host=args.host,
        port=args.port,
        triton_url=args.triton_url,
        triton_model=args.triton_model,
        served_model_name=args.served_model_name,
        model_map=args.model_map,
        max_request_bytes=args.max_request_bytes,
        request_body_timeout_s=args.request_body_timeout_s,
        max_messages=args.max_messages,
        max_text_chars=args.max_text_chars,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_source_pixels=args.max_image_source_pixels,
        min_image_side=args.min_image_side,
        max_image_aspect_ratio=args.max_image_aspect_ratio,
        max_request_pixels=args.max_request_pixels,
        max_concurrent_requests=args.max_concurrent_requests,
        request_timeout_s=args.request_timeout_s,
        stream_idle_timeout_s=args.stream_idle_timeout_s,
        shutdown_timeout_s=args.shutdown_timeout_s,
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        image_min_pixels=args.image_min_pixels,
        image_max_pixels=args.image_max_pixels,
        image_fetch=args.image_fetch,
        image_fetch_allowed_domains=args.image_fetch_allowed_domains,
        image_fetch_allow_private_hosts=args.image_fetch_allow_private_hosts,
        image_fetch_max_bytes=args.image_fetch_max_bytes,
        image_fetch_connect_timeout_s=args.image_fetch_connect_timeout_s,
        image_fetch_timeout_s=args.image_fetch_timeout_s,
        image_fetch_concurrency=args.image_fetch_concurrency,
        lazy_load=args.lazy_load,
        load_timeout_s=args.load_timeout_s,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_require_auth=args.metrics_require_auth,
    )
