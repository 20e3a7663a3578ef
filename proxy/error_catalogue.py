"""Every error a client can get from the proxy: `APIError`, and the catalogue of them.

An `ErrorEntry` is one `error.code`: its HTTP status, its OpenAI `type` (from the status),
the `cause` the metrics count it under (one of `metrics.CAUSES`: proxy/observability/metrics.py
`error_cause` looks the code up here), whether it tells the client when to retry
(`Retry-After`) and its message, a `str.format` template of the fields its raise sites pass.
Calling an entry builds the error:

    raise TOO_MANY_IMAGES(param, limit=16)

A code whose wording differs from site to site (`invalid_value`, `timeout`, ...) has the
template "{message}" and its sites pass `message=`. Errors the model reports keep the model's
message, param and code (proxy/transport/backend.py `client_error`); `MODEL_ERRORS` gives them their
status, type and cause.

A new error is a new entry here; tests/unit/test_error_catalogue.py checks that nothing else
in proxy/ builds an `APIError` or names a code, and that every cause is a metrics label.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

# OpenAI's error `type`s.
INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "requests"  # request-rate 429s
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"
# Seconds a 429 or 503 tells clients to wait (Retry-After): capacity frees up as fast as
# completions end, and a restarted backend is reconnected within seconds.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error with a message meant for the client, rendered as an OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        # Sent with the envelope: Retry-After on 429/503, WWW-Authenticate on 401.
        self.headers = dict(headers) if headers else None

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, type=self.type, param=self.param, code=self.code)


def error_envelope(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    """The OpenAI `type` of an error with this HTTP status."""
    if status == 429:
        return RATE_LIMIT
    if status == 503:
        return SERVICE_UNAVAILABLE
    return INVALID_REQUEST if status < 500 else SERVER_ERROR


@dataclass(frozen=True)
class ErrorEntry:
    """One error code; calling it (`ENTRY(param, **fields)`) builds its `APIError`."""

    code: str | None
    status: int
    _: KW_ONLY
    cause: str  # the metrics label: one of metrics.CAUSES
    template: str = "{message}"
    retry_after: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # sent with it besides Retry-After

    @property
    def type(self) -> str:
        return error_type(self.status)

    @property
    def fields(self) -> frozenset[str]:
        """The names the template needs."""
        return frozenset(name for _, name, _, _ in string.Formatter().parse(self.template) if name)

    def __call__(self, param: str | None = None, /, **fields: Any) -> APIError:
        return self.with_message(self.template.format(**fields), param)

    def with_message(self, message: str, param: str | None = None) -> APIError:
        """This error with a message written elsewhere (the model's)."""
        headers = dict(self.headers)
        if self.retry_after:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return APIError(
            self.status, message, type=self.type, param=param, code=self.code, headers=headers
        )


CATALOGUE: dict[str, ErrorEntry] = {}


def _entry(code: str, status: int, **kwargs: Any) -> ErrorEntry:
    if code in CATALOGUE:
        raise ValueError(f"error code {code!r} is in the catalogue twice")
    CATALOGUE[code] = entry = ErrorEntry(code, status, **kwargs)
    return entry


# ---- routing, the body, the request as a whole -----------------------------------------

NOT_FOUND = _entry("not_found", 404, cause="not_found", template="Invalid URL ({route})")
METHOD_NOT_ALLOWED = _entry(
    "method_not_allowed", 405, cause="not_found", template="Method not allowed ({route})"
)
MODEL_NOT_FOUND = _entry("model_not_found", 404, cause="not_found")
INVALID_API_KEY = _entry(
    "invalid_api_key",
    401,
    cause="auth",
    template="Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
    headers=(("WWW-Authenticate", 'Bearer realm="api"'),),
)
REQUEST_TOO_LARGE = _entry(
    "request_too_large",
    413,
    cause="body_too_large",
    template="Request body too large: the limit is {limit} bytes",
)
REQUEST_TIMEOUT = _entry(
    "request_timeout",
    408,
    cause="timeout",
    template="The request body did not arrive within {seconds:g} s.",
)
INVALID_JSON = _entry(
    "invalid_json",
    400,
    cause="invalid_request",
    template="We could not parse the JSON body of your request. Send valid JSON.",
)
INVALID_BODY = _entry(
    "invalid_body", 400, cause="invalid_request", template="The request body must be a JSON object."
)
INVALID_UNICODE = _entry(
    "invalid_unicode",
    400,
    cause="invalid_request",
    template="The request contains an unpaired UTF-16 surrogate (such as \\ud800), which is "
    "not valid Unicode text.",
)

# ---- admission: capacity, deadlines, draining ------------------------------------------

RATE_LIMIT_EXCEEDED = _entry(
    "rate_limit_exceeded",
    429,
    cause="rate_limited",
    template="The server is at capacity ({capacity} requests in flight); retry shortly.",
    retry_after=True,
)
SERVER_SHUTTING_DOWN = _entry(
    "server_shutting_down",
    503,
    cause="shutting_down",
    template="The server is shutting down; retry on another instance.",
    retry_after=True,
)
# The whole request's deadline, or a stream the model stopped feeding.
TIMEOUT = _entry("timeout", 504, cause="timeout")

# ---- the request's fields (proxy/request/schema.py, proxy/media/pixels.py) ---------------------------

INVALID_VALUE = _entry("invalid_value", 400, cause="invalid_request")
INVALID_TYPE = _entry("invalid_type", 400, cause="invalid_request")
MISSING_REQUIRED_PARAMETER = _entry(
    "missing_required_parameter",
    400,
    cause="invalid_request",
    template="Missing required parameter: '{path}'.",
)
UNSUPPORTED_PARAMETER = _entry("unsupported_parameter", 400, cause="invalid_request")
# The model reports it too, in its own words.
UNSUPPORTED_CONTENT_TYPE = _entry(
    "unsupported_content_type",
    400,
    cause="invalid_request",
    template="Unsupported content part type '{kind}' in '{path}': this server accepts "
    "{supported} parts.",
)

# ---- per-request limits (proxy/request/limits.py) ----------------------------------------------

TOO_MANY_MESSAGES = _entry(
    "too_many_messages",
    400,
    cause="invalid_request",
    template="Too many messages: {count}; this server accepts at most {limit} per request.",
)
TOO_MANY_PROMPTS = _entry(
    "too_many_prompts",
    400,
    cause="invalid_request",
    template="Too many prompts: {count}; this server accepts at most {limit} per request.",
)
TEXT_TOO_LONG = _entry(
    "text_too_long",
    400,
    cause="invalid_request",
    template="The messages hold more than {limit} characters of text; shorten them.",
)
# The model reports it too, in its own words.
TOO_MANY_IMAGES = _entry(
    "too_many_images",
    400,
    cause="invalid_request",
    template="Too many images: this server accepts at most {limit} per request.",
)
TOO_MANY_PIXELS = _entry(
    "too_many_pixels",
    400,
    cause="invalid_request",
    template="The images of this request hold more than {limit} pixels in all; send fewer or "
    "smaller images.",
)

# ---- images: URLs, fetching, bytes and headers -----------------------------------------

INVALID_IMAGE_URL = _entry("invalid_image_url", 400, cause="invalid_request")
IMAGE_URL_FORBIDDEN = _entry("image_url_forbidden", 400, cause="invalid_request")
IMAGE_FETCH_FAILED = _entry(
    "image_fetch_failed",
    400,
    cause="image_fetch",
    template="The image could not be fetched: {reason}.",
)
IMAGE_FETCH_TIMEOUT = _entry(
    "image_fetch_timeout",
    400,
    cause="image_fetch",
    template="Fetching the image took longer than {seconds:g} s.",
)
# Not a JPEG, PNG, WebP or GIF, or not a complete one; the model reports it too.
INVALID_IMAGE = _entry("invalid_image", 400, cause="invalid_request")
# Over the byte or the pixel limit, inline or fetched; the model reports it too.
IMAGE_TOO_LARGE = _entry("image_too_large", 400, cause="invalid_request")
IMAGE_TOO_SMALL = _entry(
    "image_too_small",
    400,
    cause="invalid_request",
    template="The image is {width}x{height} pixels; both sides must be at least {min_side} pixels.",
)
IMAGE_ASPECT_RATIO_TOO_LARGE = _entry(
    "image_aspect_ratio_too_large",
    400,
    cause="invalid_request",
    template="The image is {width}x{height} pixels; its aspect ratio must be at most {limit:g}:1.",
)

# ---- videos (proxy/media/videos.py): the image errors' counterparts ---------------------------

TOO_MANY_VIDEOS = _entry(
    "too_many_videos",
    400,
    cause="invalid_request",
    template="Too many videos: this server accepts at most {limit} per request.",
)
INVALID_VIDEO_URL = _entry("invalid_video_url", 400, cause="invalid_request")
VIDEO_URL_FORBIDDEN = _entry("video_url_forbidden", 400, cause="invalid_request")
VIDEO_FETCH_FAILED = _entry(
    "video_fetch_failed",
    400,
    cause="image_fetch",
    template="The video could not be fetched: {reason}.",
)
VIDEO_FETCH_TIMEOUT = _entry(
    "video_fetch_timeout",
    400,
    cause="image_fetch",
    template="Fetching the video took longer than {seconds:g} s.",
)
# Not a container the model decodes, a broken frame list; the model reports it too.
INVALID_VIDEO = _entry("invalid_video", 400, cause="invalid_request")
# Over the byte limit, or (the model) too long, too many frames, too high a resolution.
VIDEO_TOO_LARGE = _entry("video_too_large", 400, cause="invalid_request")

# ---- the backend and the model ---------------------------------------------------------

BACKEND_UNAVAILABLE = _entry(
    "backend_unavailable",
    503,
    cause="backend_unavailable",
    template="The inference backend is unavailable; retry later.",
    retry_after=True,
)
# The model's queue is full.
SERVER_BUSY = _entry(
    "server_busy",
    503,
    cause="overloaded",
    template="The model is at capacity; retry shortly.",
    retry_after=True,
)
MODEL_UNAVAILABLE = _entry(
    "model_unavailable",
    503,
    cause="backend_unavailable",
    template="The model is not available right now (restarting or reloading); retry shortly.",
    retry_after=True,
)
MODEL_NOT_READY = _entry(
    "model_not_ready",
    503,
    cause="backend_unavailable",
    template="The model is not ready to serve requests.",
)
# --lazy-load (proxy/transport/loader.py).
MODEL_NOT_LOADED = _entry(
    "model_not_loaded",
    503,
    cause="backend_unavailable",
    template="model not loaded yet (lazy loading: the first request loads it)",
)
MODEL_LOADING = _entry(
    "model_loading",
    503,
    cause="backend_unavailable",
    template="The model is still loading after {timeout_s:g} s; retry later.",
)
MODEL_LOAD_FAILED = _entry(
    "model_load_failed",
    503,
    cause="backend_unavailable",
    template="The model could not be loaded; retry later.",
)
# Only the model reports it: the prompt and max_tokens do not fit the context.
CONTEXT_LENGTH_EXCEEDED = _entry("context_length_exceeded", 400, cause="invalid_request")
# Anything that failed in the proxy or the model; the log has the details.
INTERNAL_ERROR = _entry(
    "internal_error",
    500,
    cause="internal_error",
    template="internal server error (request id {request_id})",
)

# ---- Triton's own errors (proxy/transport/backend.py model_error) ---------------------------

# Triton reports its own failures only as text. These phrases, and only these, say that the
# model cannot take requests right now; each becomes the error beside it (the first that
# occurs in the message wins). The original text goes to the log only.
TRITON_ERRORS: tuple[tuple[str, ErrorEntry], ...] = (
    # The model's Python-backend stub process died (the OOM killer, a crash in native code):
    # "Stub process '<model>_0_0' is not healthy." Triton 2.51 never restarts a decoupled
    # model's stub, so this replica serves nothing until it is restarted (docs/deploy.md).
    ("is not healthy", BACKEND_UNAVAILABLE),
    ("Failed to obtain the health mutex", BACKEND_UNAVAILABLE),
    # The server is stopping, or the model is unloaded, loading or being replaced.
    ("Server is stopping", MODEL_UNAVAILABLE),
    ("has no available versions", MODEL_UNAVAILABLE),
    ("Request for unknown model", MODEL_UNAVAILABLE),
    ("is not ready", MODEL_UNAVAILABLE),
    ("Server not ready", MODEL_UNAVAILABLE),
)


def triton_error(message: str) -> ErrorEntry | None:
    """The catalogue entry of one of Triton's own error messages; None when it is none of
    `TRITON_ERRORS` (a model failure: the caller's 500)."""
    return next((entry for phrase, entry in TRITON_ERRORS if phrase in message), None)


# ---- stored state: files, stored responses, batches (proxy/state/) -----------------------

# --no-state: the routes that need the database exist but cannot work.
STATE_DISABLED = _entry(
    "state_disabled",
    501,
    cause="not_found",
    template="This server runs without stored state (--no-state): {what} are not available.",
)
# An unknown id, or another tenant's (indistinguishable on purpose): OpenAI's words, no code.
NO_SUCH_OBJECT = ErrorEntry(None, 404, cause="not_found", template="No such {kind} object: {id}")
# An upload beyond --file-max-bytes, found while it streams (nothing of it is kept).
FILE_TOO_LARGE = _entry(
    "file_too_large",
    413,
    cause="body_too_large",
    template="The file is larger than this server's limit of {limit} bytes.",
)

# ---- stored responses (proxy/api/responses/) ------------------------------------------

# An unknown, expired or another tenant's response id (indistinguishable on purpose): OpenAI's
# words, no code.
RESPONSE_NOT_FOUND = ErrorEntry(
    None, 404, cause="not_found", template="Response with id '{id}' not found."
)
PREVIOUS_RESPONSE_NOT_FOUND = _entry(
    "previous_response_not_found",
    404,
    cause="not_found",
    template="Previous response with id '{id}' not found.",
)
CONVERSATION_TOO_LONG = _entry(
    "conversation_too_long",
    400,
    cause="invalid_request",
    template="The conversation before this response is longer than this server continues: at "
    "most {max_turns} turns and {max_bytes} bytes (--responses-max-history-turns, "
    "--responses-max-history-bytes). Start a new conversation with what it needs in 'input'.",
)
# Cancelling a response that is not a running background one.
RESPONSE_NOT_CANCELLABLE = _entry("response_not_cancellable", 400, cause="invalid_request")
# The error of a background response whose process ended (killed, crashed) while it ran.
BACKGROUND_INTERRUPTED = _entry(
    "background_interrupted",
    500,
    cause="internal_error",
    template="The server running this background response stopped before it finished; create "
    "the response again.",
)

# ---- the Batch API (proxy/api/batches/) ------------------------------------------------

BATCH_NOT_CANCELLABLE = _entry(
    "batch_not_cancellable",
    400,
    cause="invalid_request",
    template="The batch is {status}: only a validating or in-progress batch can be cancelled.",
)
# A line of the input file the batch cannot run: an entry of its error file (the rest runs).
INVALID_JSON_LINE = _entry(
    "invalid_json_line",
    400,
    cause="invalid_request",
    template="Line {line} is not a JSON object: {reason}.",
)
INVALID_BATCH_LINE = _entry("invalid_batch_line", 400, cause="invalid_request")
BATCH_LINE_TOO_LARGE = _entry(
    "batch_line_too_large",
    413,
    cause="body_too_large",
    template="Line {line} is larger than {limit} bytes, the largest request this server "
    "accepts (--max-request-bytes).",
)
# A line that was started this many times without an answer (the proxy died each time).
LINE_ATTEMPTS_EXHAUSTED = _entry(
    "line_attempts_exhausted",
    500,
    cause="internal_error",
    template="The request was started {attempts} times without an answer (the server stopped "
    "each time); it is not tried again.",
)
BATCH_EXPIRED = _entry(
    "batch_expired",
    504,
    cause="timeout",
    template="This request could not be executed before the completion window expired.",
)
# Why a batch failed validation: its `errors.data` (the batch runs none of its lines).
DUPLICATE_CUSTOM_ID = _entry(
    "duplicate_custom_id",
    400,
    cause="invalid_request",
    template="The custom_id {custom_id} of line {line} is also the custom_id of line {first}; "
    "custom_id must be unique within a batch.",
)
EMPTY_FILE = _entry(
    "empty_file", 400, cause="invalid_request", template="The input file has no requests."
)
BATCH_TOO_LARGE = _entry(
    "batch_too_large",
    400,
    cause="invalid_request",
    template="The input file has more than {limit} requests, the most one batch may hold "
    "(--batch-max-lines).",
)
INPUT_FILE_NOT_FOUND = _entry(
    "input_file_not_found",
    400,
    cause="not_found",
    template="The input file {file_id} was deleted before the batch was validated.",
)

# ---- LoRA adapters: POST /v1/load_lora_adapter, /v1/unload_lora_adapter ---------------

# vLLM's words for a name already served.
LORA_ALREADY_LOADED = _entry(
    "lora_already_loaded",
    400,
    cause="invalid_request",
    template="The lora adapter '{name}' has already been loaded.",
)
INVALID_LORA_PATH = _entry(
    "invalid_lora_path",
    400,
    cause="invalid_request",
    template="lora_path must be a directory path under the model's adapter roots: {reason}.",
)
INVALID_LORA_NAME = _entry(
    "invalid_lora_name",
    400,
    cause="invalid_request",
    template="lora_name must be {rule}.",
)

# ---- the model's request errors (proxy/transport/backend.py client_error) ------------------------

# The codes the model puts on its `invalid_request` errors (model_repository/.../qwen_vl_backend).
MODEL_ERRORS: dict[str, ErrorEntry] = {
    entry.code: entry
    for entry in (
        INVALID_IMAGE,
        IMAGE_TOO_LARGE,
        TOO_MANY_IMAGES,
        INVALID_VIDEO,
        VIDEO_TOO_LARGE,
        TOO_MANY_VIDEOS,
        UNSUPPORTED_CONTENT_TYPE,
        CONTEXT_LENGTH_EXCEEDED,
    )
    if entry.code is not None
}
# The model's request errors without a code (or with one this catalogue does not know yet).
MODEL_REQUEST_ERROR = ErrorEntry(None, 400, cause="invalid_request")
