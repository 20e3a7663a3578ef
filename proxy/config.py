"""Proxy settings: command-line flags, each with an environment-variable fallback.

`ProxyConfig` holds one settings object per component (its *sections*); each section's
dataclass holds the defaults. `SETTINGS` is the table of flags: one row per section field,
naming it and saying why it exists. Everything else follows from the row:

    flag     `--` + the section's flag prefix + the field name, `_` -> `-`
             (`fetch.max_bytes` -> `--image-fetch-max-bytes`)
    env var  `PROXY_` + the flag name upper-cased, `-` -> `_` (`PROXY_IMAGE_FETCH_MAX_BYTES`)
    key      the flag name with `-` -> `_`: argparse's dest and the name `with_settings` takes
    default  the section field's default; a set env var replaces it, a given flag both

A row names its flag or env var only where the rule does not give the established one.

Limits the model has too (images per request, source pixels, aspect ratio, pixel budgets,
max_tokens) default to 0: the model's own value, learned through Triton at the first request
(proxy/transport/model_limits.py). A flag can only narrow what the model allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .media.decoding import DecodeSettings
from .media.fetch import FetchPolicy
from .media.pixels import PixelLimits
from .observability.logs import LOG_FORMATS, log_format
from .observability.tracing import TraceSettings
from .request.limits import RequestLimits
from .serving.admission import AdmissionSettings
from .serving.auth import APIKeyError, api_keys, read_api_key
from .state.batches import BatchSettings
from .state.db import DatabaseURLError, async_url
from .state.responses import ResponsesSettings
from .state.settings import StateSettings
from .transport.upstreams import AFFINITY, ROUTING_POLICIES, parse_targets

_FLAG_PREFIX = "flag_prefix"  # ProxyConfig field metadata: the flags' common prefix
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Default worker processes: one per available core up to this; past it the proxy would take
# cores tritonserver and its stubs need on the same machine (docs/benchmarks.md "Stream path
# at GPU token rates").
_MAX_DEFAULT_WORKERS = 4


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, within a cgroup v2 CPU quota (a
    container's CPU limit), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/sys/fs/cgroup/cpu.max") as limit:
            quota, period = limit.read().split()
        if quota != "max":
            cores = min(cores or 1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


def default_workers() -> int:
    """Half the cores, at most 4: the proxy shares its host with tritonserver and the model's
    stub, and on 2 cores a second worker raised no ceiling (docs/benchmarks.md, "Stream path
    at GPU token rates")."""
    return max(1, min(available_cores() // 2, _MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class ServerSettings:
    """Where the proxy listens, what it serves from which Triton, and how it runs."""

    host: str = "0.0.0.0"
    port: int = 9000
    triton_url: str = "localhost:8001"
    triton_model: str = "qwen2_5_vl"
    served_model_name: str = "qwen2.5-vl-7b-instruct"
    # Extra served names, each mapped to a Triton model: ((name, triton_model), ...).
    model_map: tuple[tuple[str, str], ...] = ()
    max_tokens_limit: int = 0  # 0: the model's max_tokens
    shutdown_timeout_s: float = 30.0
    api_key: str = field(default="", repr=False)  # "" = no key required
    # The key of the admin routes (LoRA load/unload); "" = those routes are not served.
    admin_api_key: str = field(default="", repr=False)
    routing: str = AFFINITY  # how a request picks its Triton replica (ROUTING_POLICIES)
    lazy_load: bool = False
    load_timeout_s: float = 600.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_require_auth: bool = False
    workers: int = field(default_factory=default_workers)
    timings: bool = False  # every generation's stage timings: response bodies and histograms
    # The browser playground (GET /playground); None (auto): served only on a loopback --host.
    playground: bool | None = None


@dataclass(frozen=True)
class ProxyConfig:
    """The settings of every component; a field's metadata may give its flags a prefix."""

    server: ServerSettings = field(default_factory=ServerSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    limits: RequestLimits = field(default_factory=RequestLimits)
    pixels: PixelLimits = field(default_factory=PixelLimits, metadata={_FLAG_PREFIX: "image-"})
    fetch: FetchPolicy = field(default_factory=FetchPolicy, metadata={_FLAG_PREFIX: "image-fetch-"})
    state: StateSettings = field(default_factory=StateSettings)
    responses: ResponsesSettings = field(
        default_factory=ResponsesSettings, metadata={_FLAG_PREFIX: "responses-"}
    )
    batch: BatchSettings = field(default_factory=BatchSettings, metadata={_FLAG_PREFIX: "batch-"})
    tracing: TraceSettings = field(default_factory=TraceSettings, metadata={_FLAG_PREFIX: "trace-"})
    decode: DecodeSettings = field(
        default_factory=DecodeSettings, metadata={_FLAG_PREFIX: "decode-"}
    )

    @property
    def served_models(self) -> dict[str, str]:
        """Served name -> Triton model, the default (`--served-model-name`) first."""
        server = self.server
        return {server.served_model_name: server.triton_model, **dict(server.model_map)}


# ---- value parsers (argparse `type`s: a bad flag or env value is a usage error) ---------


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bool_or_auto(text: str) -> bool | None:
    """true, false, or `auto` (None: decided from other settings, as the row's why says)."""
    if text.strip().lower() == "auto":
        return None
    return _bool(text)


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


def _log_level(text: str) -> str:
    # Checked here, not only by `choices`: argparse checks choices on flags, not on defaults.
    value = text.strip().upper()
    if value not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_LOG_LEVELS)}, got {text!r}")
    return value


def _routing(text: str) -> str:
    # Checked here, not only by `choices`, for the same reason as _log_level.
    value = text.strip().lower()
    if value not in ROUTING_POLICIES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(ROUTING_POLICIES)}, got {text!r}"
        )
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _limit_int(text: str) -> int:
    """A limit the model also has: 0 means the model's own, a value may only narrow it."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (the model's) or positive, got {value}")
    return value


def _limit_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (the model's) or positive, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def _count_or_derived(text: str) -> int:
    """A count where 0 means "derived from other settings" (the row's why says how)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (derived) or positive, got {value}")
    return value


def _duration_or_forever(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 (forever) or positive seconds, got {text}")
    return value


# ---- the table -------------------------------------------------------------------------

_SECTION_PREFIXES = {
    f.name: f.metadata.get(_FLAG_PREFIX, "") for f in dataclasses.fields(ProxyConfig)
}


@dataclass(frozen=True)
class Setting:
    """One flag: the `ProxyConfig` section and field it sets, and why it exists."""

    section: str
    name: str
    parse: Callable[[str], Any]
    why: str
    flag: str = ""  # without "--"; only where the rule does not give the established name
    env: str = ""  # only where `PROXY_` + the flag does not give the established name
    choices: tuple[str, ...] = ()
    negation: str = ""  # a `--no-...` flag meaning `--<flag>=false` (bool rows)

    @property
    def narrows_model(self) -> bool:
        """A limit the model has too: 0 is the model's, a value may only narrow it."""
        return self.parse in (_limit_int, _limit_float)

    @property
    def flag_name(self) -> str:
        return self.flag or _SECTION_PREFIXES[self.section] + self.name.replace("_", "-")

    @property
    def option(self) -> str:
        return f"--{self.flag_name}"

    @property
    def key(self) -> str:
        """argparse's dest, and the name `with_settings` takes."""
        return self.flag_name.replace("-", "_")

    @property
    def env_name(self) -> str:
        return self.env or "PROXY_" + self.flag_name.upper().replace("-", "_")

    @property
    def help(self) -> str:
        return f"{self.why} [{self.env_name}]"


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    _S(
        "server",
        "host",
        str,
        "interface to listen on; use 127.0.0.1 to keep the API off the network",
    ),
    _S("server", "port", int, "HTTP port; 9000 matches Triton's own OpenAI frontend"),
    _S(
        "server",
        "triton_url",
        str,
        "Triton gRPC endpoints as host:port[,host:port...]; a name resolving to several "
        "addresses (a headless Service) means one upstream each, re-resolved every 10 s; "
        "requests go to the least busy",
        env="TRITON_GRPC_URL",
    ),
    _S(
        "server", "triton_model", str, "Triton model behind --served-model-name", env="TRITON_MODEL"
    ),
    _S(
        "server",
        "served_model_name",
        str,
        "default `model`: what requests without one get and responses echo",
        env="SERVED_MODEL_NAME",
    ),
    _S(
        "server",
        "model_map",
        _model_map,
        "more served names as name=triton_model,...: aliases or other Triton models clients "
        "can pick with `model`",
    ),
    _S(
        "admission",
        "max_request_bytes",
        _positive_int,
        "largest accepted request body; base64 images outgrow aiohttp's 1 MiB default",
    ),
    # Hardening: limits, backpressure, timeouts, shutdown and the API key (docs/security.md).
    _S(
        "admission",
        "request_body_timeout_s",
        _positive_float,
        "seconds to receive a request body (408 after), so a client that trickles its body "
        "cannot hold an in-flight slot",
    ),
    _S(
        "limits",
        "max_messages",
        _positive_int,
        "messages per request; bounds validation and chat-template work per request",
    ),
    _S(
        "limits",
        "max_prompts",
        _positive_int,
        "prompts per /v1/completions request; each is a generation of its own and they run "
        "at once, so this bounds the KV slots and model queue one admitted request takes",
    ),
    _S(
        "limits",
        "max_text_chars",
        _positive_int,
        "characters of text per request, all messages together; bounds tokenizer work and is "
        "above what a 128k-token context holds",
    ),
    _S(
        "limits",
        "max_images",
        _limit_int,
        "images per request, refused here before any image is fetched or decoded; 0 = the "
        "model's max_images (16 unless it was set otherwise), which a value can only lower",
    ),
    _S(
        "limits",
        "max_image_bytes",
        _positive_int,
        "encoded bytes per image (after base64 decoding); bounds memory per image",
    ),
    _S(
        "limits",
        "max_image_source_pixels",
        _limit_int,
        "width x height per image, read from its header before anything decodes it "
        "(decompression bombs); 0 = the model's max_source_pixels (40 MP = 120 MB of RGB)",
    ),
    _S(
        "limits",
        "min_image_side",
        _positive_int,
        "smallest width or height accepted; 1 accepts any image (the model upscales tiny ones "
        "onto its 28-px grid), raise it to refuse images with no content",
    ),
    _S(
        "limits",
        "max_image_aspect_ratio",
        _limit_float,
        "longest over shortest side; 0 = the model's max_aspect_ratio (Qwen's resize refuses "
        "beyond 200)",
    ),
    _S(
        "limits",
        "max_request_pixels",
        _positive_int,
        "source pixels of all images of a request together: the model decodes them all at "
        "full size before resizing (200 MP = 600 MB of RGB; 16 12-MP photos fit)",
    ),
    _S(
        "limits",
        "max_videos",
        _limit_int,
        "videos per request, refused before any is fetched; 0 = the model's max_videos, which "
        "a value can only lower (each video is tens of frames through the vision tower)",
    ),
    _S(
        "limits",
        "max_video_bytes",
        _positive_int,
        "encoded bytes per video (after base64 decoding, or fetched); bounds memory per video "
        "before the model reads its container header",
    ),
    _S(
        "limits",
        "max_tools",
        _limit_int,
        "tools per request; each one's schema is compiled into the model's grammar when a call "
        "is forced; 0 = the model's max_tools, which a value can only lower",
    ),
    _S(
        "limits",
        "max_schema_bytes",
        _limit_int,
        "bytes of one JSON Schema (a tool's parameters, response_format's schema), bounding "
        "grammar compile time and memory in the model; 0 = the model's, which a value can only "
        "lower",
    ),
    _S(
        "limits",
        "max_schema_depth",
        _limit_int,
        "nesting depth of one JSON Schema; hostile schemas nest deeply to stall compilers; "
        "0 = the model's, which a value can only lower",
    ),
    _S(
        "admission",
        "max_concurrent_requests",
        _positive_int,
        "generating requests (chat completions, Responses) in flight; more get 429 at once "
        "(before their body is read), bounding memory; below the model's batch + queue "
        "(16 + 64) so its queue never overflows",
    ),
    _S(
        "admission",
        "request_timeout_s",
        _positive_float,
        "total deadline of a chat completion, body to last token (504, or an SSE error once "
        "streaming); 8192 tokens of a 7B take minutes",
    ),
    _S(
        "admission",
        "stream_idle_timeout_s",
        _positive_float,
        "longest silence of the Triton stream between two responses (after the first, which "
        "waits for queueing and prefill), so a hung backend is noticed",
    ),
    _S(
        "server",
        "workers",
        _positive_int,
        "proxy processes serving --port together (SO_REUSEPORT): one event loop tops out at "
        "a few thousand streamed tokens/s, which a GPU reaches; default half the cores, at most "
        f"{_MAX_DEFAULT_WORKERS}; --max-concurrent-requests counts them all",
    ),
    _S(
        "server",
        "shutdown_timeout_s",
        _positive_float,
        "on SIGTERM, how long in-flight requests may finish before they are cancelled; keep it "
        "at tritonserver's --exit-timeout-secs (30)",
    ),
    _S(
        "server",
        "api_key",
        str,
        "require 'Authorization: Bearer <key>' on every route but /health and /ready; several "
        "keys comma-separated, each its own tenant of stored objects; empty = no key (prefer "
        "--api-key-file: flags show up in ps)",
    ),
    _S(
        "server",
        "admin_api_key",
        str,
        "the Bearer key of the admin routes (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter), distinct from every --api-key: a client key must not "
        "change what the deployment serves; empty = those routes do not exist (404)",
    ),
    _S(
        "server",
        "routing",
        _routing,
        "how a request picks among Triton replicas: affinity sends one with a LoRA adapter or "
        "an image to the replica a hash of both picks (where its adapter is resident and its "
        "image's embedding cached) unless that one is 1.25x past its share of the load; "
        "least-busy always takes the replica with the fewest in flight",
        choices=ROUTING_POLICIES,
    ),
    _S(
        "server",
        "max_tokens_limit",
        _limit_int,
        "larger max_tokens/max_completion_tokens are clamped to this, so one request cannot "
        "hold a model slot for long; 0 = the model's max_tokens_cap (8192 by default)",
    ),
    _S(
        "pixels",
        "min_pixels",
        _limit_int,
        "smallest area an image is resized to (28x28 px = 1 visual token), and the floor for "
        "a request's min_pixels; 0 = the model's min_pixels (3136), which a value can only raise",
    ),
    _S(
        "pixels",
        "max_pixels",
        _limit_int,
        "largest area an image is resized to; bounds memory and prefill time per image, and "
        "caps a request's max_pixels; 0 = the model's max_pixels (1003520 = 1280 visual "
        "tokens), which a value can only lower",
    ),
    _S(
        "fetch",
        "enabled",
        _bool,
        "fetch http(s) image URLs (guarded against private addresses); false keeps the proxy "
        "off the network and accepts only data: URLs",
        flag="image-fetch",
        negation="no-image-fetch",
    ),
    _S(
        "fetch",
        "allowed_domains",
        _domains,
        "comma-separated domains image URLs must be on (a domain covers its subdomains); "
        "empty = any public host",
    ),
    _S(
        "fetch",
        "allow_private_hosts",
        _names,
        "FOR TESTS ONLY: URL hosts (e.g. 127.0.0.1,localhost) exempt from the public-address "
        "rule, so tests can serve images locally; never set in production",
    ),
    _S(
        "fetch",
        "max_bytes",
        _positive_int,
        "largest image body fetched (enforced while reading), so a huge or endless response "
        "cannot exhaust memory",
    ),
    _S(
        "fetch",
        "connect_timeout_s",
        _positive_float,
        "seconds to connect to an image host; unreachable hosts fail fast",
    ),
    _S(
        "fetch",
        "timeout_s",
        _positive_float,
        "seconds for one image fetch in all (DNS, redirects, body), so a slow server cannot "
        "hold a request",
    ),
    _S(
        "fetch",
        "concurrency",
        _positive_int,
        "image URLs of one request fetched at the same time; bounds what one request can make "
        "the proxy open",
    ),
    _S(
        "fetch",
        "video_max_bytes",
        _positive_int,
        "largest video body fetched (enforced while reading); videos outgrow the image cap",
        flag="video-fetch-max-bytes",
    ),
    _S(
        "fetch",
        "video_timeout_s",
        _positive_float,
        "seconds for one video fetch in all (DNS, redirects, body)",
        flag="video-fetch-timeout-s",
    ),
    _S(
        "server",
        "lazy_load",
        _bool,
        "the first chat request loads the model (Triton started with "
        "--model-control-mode=explicit), as the original server did; saves memory until used",
    ),
    _S(
        "server",
        "load_timeout_s",
        _positive_float,
        "with --lazy-load, how long a request waits for the model to load before a 503 (the "
        "load goes on; a later request can wait again)",
    ),
    _S(
        "server",
        "log_level",
        _log_level,
        "verbosity of the proxy's logs (one line per request at INFO)",
        choices=_LOG_LEVELS,
    ),
    _S(
        "server",
        "log_format",
        log_format,
        "text for people; json (one object per line, request fields as keys) for log pipelines "
        "that index fields such as request_id",
        choices=LOG_FORMATS,
    ),
    _S(
        "server",
        "metrics_require_auth",
        _bool,
        "make GET /metrics need the API key like the API does; off by default because "
        "Prometheus scrapers rarely carry one (keep the port off untrusted networks instead)",
    ),
    _S(
        "server",
        "timings",
        _bool,
        "have the model measure every generation's stages (queue, media fetch and decode, "
        "preprocessing, vision tower, prefill, TTFT, decode, mean ITL): chat completions carry "
        "them as `timings` and qwen_vl_proxy_request_stage_seconds covers every request; off, "
        'only requests with `"timings": true` are measured',
    ),
    _S(
        "server",
        "playground",
        _bool_or_auto,
        "serve the browser playground at GET /playground: a static page (served without the key; "
        "its API calls send it) to try images, video and streaming; auto (the default): on when "
        "--host is a loopback address, off otherwise, so a proxy on the network shows nothing "
        "unauthenticated but the probes unless asked to",
        negation="no-playground",
    ),
    # OpenTelemetry traces (proxy/observability/tracing.py, docs/observability.md "Traces"):
    # OpenTelemetry's own environment variables, so a deployment's usual settings apply.
    _S(
        "tracing",
        "otlp_endpoint",
        str,
        "OTLP/HTTP collector to send traces to (a base URL such as http://otel-collector:4318; "
        "/v1/traces is added); empty (the default): no tracing and no cost",
        env="OTEL_EXPORTER_OTLP_ENDPOINT",
    ),
    _S(
        "tracing",
        "sample_ratio",
        _ratio,
        "share of requests traced that arrive without a traceparent; one with a traceparent is "
        "traced when it says sampled (parent-based), so the caller's sampling decides",
        env="OTEL_TRACES_SAMPLER_ARG",
    ),
    _S(
        "tracing",
        "service_name",
        str,
        "service.name of the proxy's spans: what a trace viewer lists it as",
        env="OTEL_SERVICE_NAME",
    ),
    # Durable state: files, stored responses, batches (proxy/state/, docs/state.md).
    _S(
        "state",
        "enabled",
        _bool,
        "keep files, stored responses and batches in a database; --no-state runs stateless "
        "(those routes answer 501), for a proxy that must write nothing",
        flag="state",
        negation="no-state",
    ),
    _S(
        "state",
        "state_dir",
        str,
        "directory of the embedded SQLite database (default under $XDG_STATE_HOME or "
        "~/.local/state: the same wherever the proxy starts); mount a volume here in a "
        "container",
    ),
    _S(
        "state",
        "database_url",
        str,
        "database instead of the SQLite file: postgresql://user:pass@host/db, so several "
        "replicas share files, responses and batches (logged without its password)",
    ),
    _S(
        "state",
        "file_max_bytes",
        _positive_int,
        "largest upload to /v1/files, enforced while it streams to storage (OpenAI's batch "
        "input limit is 200 MB)",
    ),
    _S(
        "state",
        "state_retention_s",
        _duration_or_forever,
        "seconds stored files, responses and batches are kept before the sweeper deletes them "
        "(OpenAI keeps them 30 days); 0 = until deleted",
    ),
    _S(
        "state",
        "state_sweep_interval_s",
        _positive_float,
        "seconds between sweeps that delete expired objects and unreferenced blobs; expired "
        "objects are never served in between",
    ),
    # Stored conversations (previous_response_id: proxy/api/responses/, docs/state.md).
    _S(
        "responses",
        "max_history_turns",
        _positive_int,
        "earlier turns a previous_response_id may bring into a request; a turn is at least two "
        "messages and a request holds at most --max-messages, and the chain is walked before "
        "anything else is checked",
    ),
    _S(
        "responses",
        "max_history_bytes",
        _positive_int,
        "bytes the earlier turns of a stored conversation may add to a request, images "
        "included, checked before any is read: what a client could send in one body "
        "(--max-request-bytes' default)",
    ),
    # The Batch API's runner (proxy/api/batches/runner.py, docs/state.md "Batches").
    _S(
        "batch",
        "concurrency",
        _count_or_derived,
        "batch lines in flight at once in this proxy (split among --workers; each replica has "
        "its own), each holding a --max-concurrent-requests slot, so it must stay below that "
        "cap: interactive requests always have room; 0 = half the cap, at most 4 (each batch "
        "row slows the steps of interactive ones on a CPU; on a GPU raise it up to the model's "
        "batch share of its slots, max_batch_priority_slots)",
    ),
    _S(
        "batch",
        "max_lines",
        _positive_int,
        "requests one batch's input file may hold (OpenAI's 50,000); bounds a batch's rows and "
        "its validation's memory (a digest per custom_id)",
    ),
    _S(
        "batch",
        "lease_s",
        _positive_float,
        "seconds a process's claim on batch work lasts unless renewed (every third of it): "
        "when a proxy dies, another replica, or the restarted one, takes its work over this "
        "long after",
    ),
    _S(
        "batch",
        "poll_s",
        _positive_float,
        "seconds between looks for batch work that other processes or replicas created or gave "
        "up (a batch created here starts at once); one small query each",
    ),
    _S(
        "batch",
        "line_attempts",
        _positive_int,
        "times a batch line may be started without an answer (the proxy died running it) "
        "before it is failed, so a request that kills the proxy cannot stall its batch",
    ),
    # The decode sandbox (proxy/media/decoding.py, docs/security.md "Decode sandbox").
    _S(
        "decode",
        "workers",
        _positive_int,
        "worker processes per proxy process that read image headers, so no image parser runs "
        "in the proxy; more images than this wait for a free one",
    ),
    _S(
        "decode",
        "memory_mib",
        _positive_int,
        "address space of one decode worker (RLIMIT_AS); a header read needs far less, a "
        "parser exploit that allocates fails at it",
    ),
    _S(
        "decode",
        "cpu_s",
        _positive_int,
        "CPU seconds one image's header read may use before the kernel kills its worker "
        "(RLIMIT_CPU)",
    ),
    _S(
        "decode",
        "worker_tasks",
        _positive_int,
        "images a decode worker reads before it is replaced, so a compromised parser sees few "
        "later requests' images (1: a fresh process per image)",
    ),
    _S(
        "decode",
        "timeout_s",
        _positive_float,
        "seconds one header read may take before its worker is deemed hung, killed and replaced "
        "(the image is refused)",
    ),
)
del _S

_BY_KEY = {setting.key: setting for setting in SETTINGS}

# Not a setting of its own: another source of `api_key` (read_api_key), exclusive with it.
API_KEY_FILE_FLAG = "--api-key-file"
API_KEY_FILE_ENV = "PROXY_API_KEY_FILE"
_API_KEY_FILE_HELP = (
    "file holding the API key, or several, one per line (a mounted secret); blank lines, "
    f"lines starting with # and whitespace around keys are ignored [{API_KEY_FILE_ENV}]"
)


def env_names() -> set[str]:
    """Every environment variable the proxy reads."""
    return {setting.env_name for setting in SETTINGS} | {API_KEY_FILE_ENV}


# ---- flags -> ProxyConfig --------------------------------------------------------------


def _add(parser: argparse._ActionsContainer, setting: Setting) -> None:
    options: dict[str, Any] = {
        "dest": setting.key,
        "type": setting.parse,
        # A set env var goes in as a string: argparse runs it through the flag's `type`, so a
        # bad env value gets the same usage error as a bad flag. Unset, the default is None
        # (not the section's default, which parse_config fills in): a mutually exclusive
        # flag given with its default value still counts as given.
        "default": os.environ.get(setting.env_name),
        "help": setting.help,
    }
    if setting.parse in (_bool, _bool_or_auto):
        options.update(nargs="?", const=True)
    if setting.choices:
        options["choices"] = setting.choices
    parser.add_argument(setting.option, **options)


def build_parser() -> argparse.ArgumentParser:
    """The flags of SETTINGS; a setting neither flag nor env var gives is None here."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="OpenAI-compatible chat completions API backed by Triton (gRPC streaming).",
    )
    for setting in SETTINGS:
        if setting.negation:
            group = parser.add_mutually_exclusive_group()
            _add(group, setting)
            group.add_argument(
                f"--{setting.negation}",
                dest=setting.key,
                action="store_false",
                help=f"same as {setting.option}=false",
            )
        elif setting.key == "api_key":
            group = parser.add_mutually_exclusive_group()
            _add(group, setting)
            group.add_argument(
                API_KEY_FILE_FLAG,
                default=os.environ.get(API_KEY_FILE_ENV, ""),
                help=_API_KEY_FILE_HELP,
            )
        else:
            _add(parser, setting)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ProxyConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.api_key = read_api_key(args.api_key or "", args.api_key_file)
    except APIKeyError as exc:
        parser.error(str(exc))
    given = {key: getattr(args, key) for key in _BY_KEY if getattr(args, key) is not None}
    config = with_settings(ProxyConfig(), **given)
    problem = _inconsistency(config)
    if problem:
        parser.error(problem)
    return config


def _inconsistency(config: ProxyConfig) -> str | None:
    """What no single flag's parser can see: a bound, or two settings at odds."""
    if 0 < config.limits.max_image_aspect_ratio < 1:
        return "--max-image-aspect-ratio must be 0 (the model's) or at least 1"
    if 0 < config.pixels.max_pixels < config.pixels.min_pixels:
        return "--image-min-pixels must not exceed --image-max-pixels"
    try:
        parse_targets(config.server.triton_url)
    except ValueError as exc:
        return f"--triton-url: {exc}"
    admin_key = config.server.admin_api_key
    if admin_key and admin_key in api_keys(config.server.api_key):
        return "--admin-api-key must differ from every --api-key"
    if admin_key and not admin_key.isprintable():
        return "--admin-api-key must be printable text"
    if config.server.served_model_name in dict(config.server.model_map):
        return "--model-map must not remap --served-model-name"
    if config.state.database_url:
        try:
            async_url(config.state.database_url)
        except DatabaseURLError as exc:
            return f"--database-url: {exc}"
    if config.batch.concurrency >= config.admission.max_concurrent_requests:  # 0 passes
        return (
            "--batch-concurrency must be below --max-concurrent-requests: batch lines hold "
            "admission slots, and interactive requests need some"
        )
    return None


def with_settings(config: ProxyConfig, **values: Any) -> ProxyConfig:
    """`config` with settings replaced, named by their flag with `-` -> `_` (`max_images=2`,
    `image_fetch=False`, `image_max_pixels=...`); an unknown name is a TypeError."""
    changes: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        setting = _BY_KEY.get(key)
        if setting is None:
            raise TypeError(f"no proxy setting is named {key!r} (see proxy/config.py SETTINGS)")
        changes.setdefault(setting.section, {})[setting.name] = value
    return dataclasses.replace(
        config,
        **{
            section: dataclasses.replace(getattr(config, section), **fields)
            for section, fields in changes.items()
        },
    )
