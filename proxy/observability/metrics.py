"""The proxy's Prometheus metrics: definitions, the `/metrics` route and error causes.

Every metric lives in one `CollectorRegistry` per application (`METRICS_KEY`), so two apps in
one process (tests) never share counts. What feeds them is proxy/observability/observe.py; what they mean,
with PromQL, is docs/observability.md.

Label values come from closed sets, never from the client: `route` is the matched route
template (`/v1/models/{model}`, `unmatched`), `method` one of the HTTP methods the proxy knows
or `other`, `model` a served model name from the configuration or a LoRA adapter's name (the
first `loras.MAX_LABELLED_ADAPTERS` of them; later ones `other-lora`), `upstream` a Triton
address from --triton-url and its DNS answers, `cause` one of `CAUSES`,
`kind` a media kind's name (`image`, `video`; `mixed` for a request's timings when it has
several kinds).
"""

from __future__ import annotations

import os

import prometheus_client
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from ..error_catalogue import CATALOGUE
from ..transport.contract import TIMING_STAGES

# `<name>_created` series double the series count and no dashboard here uses them.
prometheus_client.disable_created_metrics()

NAMESPACE = "qwen_vl_proxy"
METRICS_PATH = "/metrics"
# prometheus_client's multiprocess mode: set (before it is imported) in every worker's
# environment, it makes all metrics write to files in that directory.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Bucket bounds, in seconds. TTFT shares the model's bounds (model.py TTFT_BUCKETS: a tiny
# model on CPU to a 7B prefill of several images on a busy GPU), plus 60 s for requests that
# queued, so the proxy's and the model's histograms compare bucket by bucket; the difference
# is what the proxy adds (body, images, queueing in Triton).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Gaps between streamed chunks: ~1 ms (tiny model, CPU) to 20-60 ms per token (7B on one
# GPU) to stalls of seconds when a long prefill joins the running batch.
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Whole requests: probes and rejections take milliseconds; 8192 tokens at 30 ms each take
# about 4 minutes, hence the long tail.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)  # fmt: skip
# Fetching a request's remote media (concurrently): LAN ~10 ms, internet 0.1-2 s, the
# default --image-fetch-timeout-s is 20 s (--video-fetch-timeout-s 60 s).
MEDIA_FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# Decoding a request's data: URL media (base64, about 1 ms per MB) and checking every part
# (image headers parsed in a thread): 0.1 ms for a thumbnail to ~100 ms for a 64 MiB body.
MEDIA_CHECK_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

# A request's stages (proxy/observability/observe.py `stage_timings`): the proxy's media fetch,
# then what the model measured (contract.TIMING_STAGES), ttft from the proxy's arrival. From
# a fraction of a millisecond (a queue, a cached image's vision) to minutes (a long decode).
STAGES = (TIMING_STAGES[0], "media_fetch", *TIMING_STAGES[1:])
STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
MIXED_MEDIA = "mixed"  # the `kind` of a request's media timings when it has several kinds

# ---- error causes ----------------------------------------------------------------------

CAUSES = (
    "invalid_request",
    "not_found",
    "auth",
    "rate_limited",
    "overloaded",
    "body_too_large",
    "timeout",
    "image_fetch",
    "backend_unavailable",
    "shutting_down",
    "internal_error",
)
# Errors with no code the catalogue knows (aiohttp's other HTTP errors, other middlewares',
# the model's request errors without a code) count by their status.
_CAUSE_BY_STATUS = {
    400: "invalid_request",
    401: "auth",
    403: "auth",
    404: "not_found",
    405: "not_found",
    408: "timeout",
    413: "body_too_large",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    502: "backend_unavailable",
    503: "backend_unavailable",
    504: "timeout",
}


def error_cause(status: int, code: str | None) -> str:
    """The `cause` label of an error envelope (its HTTP status and `error.code`): the cause
    its code has in proxy/error_catalogue.py, else the status's; always one of `CAUSES`."""
    entry = CATALOGUE.get(code) if code else None
    if entry is not None:
        return entry.cause
    if status in _CAUSE_BY_STATUS:
        return _CAUSE_BY_STATUS[status]
    return "invalid_request" if status < 500 else "internal_error"


# ---- the metrics -----------------------------------------------------------------------


class ProxyMetrics:
    """The proxy's metrics, registered in their own registry."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # What /metrics shows: this registry, or with --workers N every worker's metrics, which
        # prometheus_client writes to files in MULTIPROCESS_DIR_ENV (proxy/serving/workers.py)
        # and this collector sums; process_* would describe only the worker scraped, so none.
        self.exposed = registry
        if os.environ.get(MULTIPROCESS_DIR_ENV):
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)
        elif process_metrics:
            # process_* (CPU, memory, open fds), python_gc_*, python_info: what every
            # Prometheus client exports by default.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple) -> Histogram:
            return Histogram(
                name, doc, labels, namespace=NAMESPACE, buckets=buckets, registry=registry
            )

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        self.requests = counter(
            "requests",
            "HTTP requests answered, by route template, method and status "
            "(499: the client disconnected first)",
            ("route", "method", "status"),
        )
        self.in_flight = Gauge(
            "requests_in_flight",
            "HTTP requests being handled now (scrapes of /metrics excluded)",
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livesum",  # with workers: the sum over those running
        )
        self.duration = histogram(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response (the last event of a "
            "stream), by route template",
            ("route",),
            DURATION_BUCKETS,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Streamed chat completions: time from the request's arrival to its first content chunk",
            ("model",),
            TTFT_BUCKETS,
        )
        self.inter_token = histogram(
            "inter_token_latency_seconds",
            "Streamed chat completions: gap between consecutive content chunks",
            ("model",),
            INTER_TOKEN_BUCKETS,
        )
        self.generations = counter(
            "generations",
            "Generations started (a completions request of several prompts counts each), by "
            "served model: a LoRA adapter's requests under the adapter's name",
            ("model",),
        )
        self.prompt_tokens = counter(
            "prompt_tokens", "Prompt tokens of chat completions (image tokens included)", ("model",)
        )
        self.completion_tokens = counter(
            "completion_tokens",
            "Completion tokens generated for chat completions (also those of cancelled ones)",
            ("model",),
        )
        self.image_tokens = counter(
            "image_tokens",
            "Image tokens among the prompt tokens (usage.prompt_tokens_details.image_tokens)",
            ("model",),
        )
        self.stages = histogram(
            "request_stage_seconds",
            "Generations whose model measured their stages (asked with `timings`, or every one "
            "with --timings): seconds per stage (queue, media_fetch, media_decode, preprocess, "
            "vision, prefill, ttft, decode, mean_itl; docs/observability.md)",
            ("stage",),
            STAGE_BUCKETS,
        )
        self.media_parts = counter(
            "media_parts",
            "Media parts in requests, by kind (image, video) and source (inline data: URL or "
            "remote)",
            ("kind", "source"),
        )
        self.media_fetch = histogram(
            "media_fetch_seconds",
            "Per request with remote media: time to fetch all of them (concurrently), failed "
            "fetches included, by the request's media kind (mixed: several)",
            ("kind",),
            MEDIA_FETCH_BUCKETS,
        )
        self.media_check = histogram(
            "media_check_seconds",
            "Per request with media: time to decode its data: URLs and check all its parts "
            "(format, bytes; pixels and aspect ratio of images), failures included, by the "
            "request's media kind (mixed: several)",
            ("kind",),
            MEDIA_CHECK_BUCKETS,
        )
        # The image-only names of the three above, kept for existing dashboards.
        self.images = counter(
            "images", "Image parts in requests, by source (inline data: URL or remote)", ("source",)
        )
        self.image_fetch = histogram(
            "image_fetch_seconds",
            "media_fetch_seconds of requests whose media are all images",
            (),
            MEDIA_FETCH_BUCKETS,
        )
        self.image_decode = histogram(
            "image_decode_seconds",
            "media_check_seconds of requests whose media are all images",
            (),
            MEDIA_CHECK_BUCKETS,
        )
        # Label values are Triton addresses from --triton-url and its DNS answers, not clients'.
        self.upstream_requests = counter(
            "upstream_requests",
            "Generations sent to each Triton upstream, by outcome (ok; retried: failed before "
            "the first token and sent to another; failed; cancelled)",
            ("upstream", "outcome"),
        )
        self.upstream_media = counter(
            "upstream_media_items",
            "Images and videos of the generations each Triton upstream completed",
            ("upstream",),
        )
        self.upstream_cache_hits = counter(
            "upstream_media_cache_hits",
            "Of upstream_media_items, those the model's embedding cache answered (the vision "
            "tower did not run): hits / items is each replica's cache-hit ratio",
            ("upstream",),
        )
        self.disconnects = counter(
            "client_disconnects",
            "Requests whose client disconnected before the response ended (the generation "
            "was cancelled in Triton), by route template",
            ("route",),
        )
        self.rejections = counter(
            "rejected_requests",
            "Requests answered with an error envelope (an HTTP error status, or an error "
            "event in a stream), by cause",
            ("cause",),
        )
        # Every cause reads 0 from the start, so rate() and absent() work before the first error.
        for cause in CAUSES:
            self.rejections.labels(cause)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format `accept` asks for (Prometheus text or OpenMetrics)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.exposed), content_type


METRICS_KEY = web.AppKey("metrics", ProxyMetrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text (or OpenMetrics when the scraper asks for it)."""
    body, content_type = request.app[METRICS_KEY].exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
