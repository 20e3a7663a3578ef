"""The error catalogue (proxy/error_catalogue.py): every error the proxy raises comes from it,
its messages are those clients have always got, and it alone gives the metrics their causes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from proxy import error_catalogue as catalogue
from proxy.error_catalogue import CATALOGUE, MODEL_ERRORS, MODEL_REQUEST_ERROR, ErrorEntry
from proxy.observability.metrics import CAUSES, error_cause
from proxy.transport.backend import client_error
from proxy.transport.contract import ModelError

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "proxy"
MODEL_CODE = ROOT / "model_repository/qwen2_5_vl/1"

ENTRIES = {name: value for name, value in vars(catalogue).items() if isinstance(value, ErrorEntry)}


# ---- nothing outside the catalogue builds an error -------------------------------------


def proxy_sources() -> list[Path]:
    return sorted(path for path in PROXY.glob("*.py") if path.name != "error_catalogue.py")


def test_no_code_is_named_outside_the_catalogue():
    leftovers = [
        f"{path.name}:{number}: {line.strip()}"
        for path in proxy_sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bcode\s*=\s*[\"']", line)
    ]
    assert leftovers == []


def constructions(path: Path, name: str) -> list[str]:
    """The functions of `path` that call `name(...)` ("<module>" for top-level calls)."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else None
            )
            if isinstance(child, ast.Call):
                callee = child.func
                called = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
                if called == name:
                    found.append(function)
            visit(child, inner or function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_every_api_error_is_built_by_the_catalogue():
    """Only aiohttp's other HTTP errors (no code, their own reason) are built elsewhere."""
    built = {
        path.name: functions
        for path in proxy_sources()
        if (functions := constructions(path, "APIError") + constructions(path, "ErrorEntry"))
    }
    assert built == {"errors.py": ["_from_http_exception"]}


# ---- the entries -----------------------------------------------------------------------


def test_codes_are_unique_and_every_entry_is_catalogued():
    coded = {name: entry for name, entry in ENTRIES.items() if entry.code is not None}
    assert len({entry.code for entry in coded.values()}) == len(coded)
    assert {entry.code: entry for entry in coded.values()} == CATALOGUE
    # One name per code, the code in capitals: `raise TOO_MANY_IMAGES(...)` says its code.
    assert all(name == entry.code.upper() for name, entry in coded.items())
    assert [name for name, entry in ENTRIES.items() if entry.code is None] == [
        "NO_SUCH_OBJECT",  # OpenAI's 404 for an unknown file, response or batch has no code
        "RESPONSE_NOT_FOUND",  # the same for a response, in OpenAI's words for it
        "MODEL_REQUEST_ERROR",
    ]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_cause_is_a_metrics_label(name):
    assert ENTRIES[name].cause in CAUSES


# OpenAI's `type` for each status the proxy answers with (as it always has).
TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    500: "server_error",
    501: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_status_and_type_agree(name):
    entry = ENTRIES[name]
    assert entry.type == TYPE_BY_STATUS[entry.status]


def test_retry_after_is_sent_by_the_errors_that_pass():
    retrying = {entry.code for entry in CATALOGUE.values() if entry.retry_after}
    assert retrying == {
        "rate_limit_exceeded",
        "server_shutting_down",
        "backend_unavailable",
        "server_busy",
        "model_unavailable",
    }
    for entry in CATALOGUE.values():
        error = entry.with_message("m")
        assert (error.headers or {}).get("Retry-After") == ("1" if entry.retry_after else None)
    assert catalogue.INVALID_API_KEY().headers == {"WWW-Authenticate": 'Bearer realm="api"'}


# Each entry once, with the fields its raise sites pass and the message clients have got
# from those sites (byte for byte).
P = "messages[0].content[1].image_url"
MESSAGES = [
    ("NOT_FOUND", None, {"route": "GET /v2/x"}, "Invalid URL (GET /v2/x)"),
    (
        "METHOD_NOT_ALLOWED",
        None,
        {"route": "PUT /v1/models"},
        "Method not allowed (PUT /v1/models)",
    ),
    (
        "MODEL_NOT_FOUND",
        "model",
        {"message": "The model `gpt-4` does not exist."},
        "The model `gpt-4` does not exist.",
    ),
    (
        "INVALID_API_KEY",
        None,
        {},
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
    ),
    ("REQUEST_TOO_LARGE", None, {"limit": 1024}, "Request body too large: the limit is 1024 bytes"),
    (
        "REQUEST_TIMEOUT",
        None,
        {"seconds": 2.5},
        "The request body did not arrive within 2.5 s.",
    ),
    (
        "INVALID_JSON",
        None,
        {},
        "We could not parse the JSON body of your request. Send valid JSON.",
    ),
    ("INVALID_BODY", None, {}, "The request body must be a JSON object."),
    (
        "INVALID_UNICODE",
        "messages[0].content",
        {},
        "The request contains an unpaired UTF-16 surrogate (such as \\ud800), which is not "
        "valid Unicode text.",
    ),
    (
        "RATE_LIMIT_EXCEEDED",
        None,
        {"capacity": 8},
        "The server is at capacity (8 requests in flight); retry shortly.",
    ),
    (
        "SERVER_SHUTTING_DOWN",
        None,
        {},
        "The server is shutting down; retry on another instance.",
    ),
    (
        "TIMEOUT",
        None,
        {"message": "The model sent nothing for 30 s."},
        "The model sent nothing for 30 s.",
    ),
    (
        "INVALID_VALUE",
        "top_logprobs",
        {"message": "Invalid value for 'top_logprobs': it requires 'logprobs' to be true."},
        "Invalid value for 'top_logprobs': it requires 'logprobs' to be true.",
    ),
    (
        "INVALID_TYPE",
        "temperature",
        {"message": "Invalid type for 'temperature': expected a number, but got a string instead."},
        "Invalid type for 'temperature': expected a number, but got a string instead.",
    ),
    (
        "MISSING_REQUIRED_PARAMETER",
        "messages",
        {"path": "messages"},
        "Missing required parameter: 'messages'.",
    ),
    (
        "UNSUPPORTED_PARAMETER",
        "response_format",
        {
            "message": "response_format type 'json_object' is not supported; only "
            "{'type': 'text'} is."
        },
        "response_format type 'json_object' is not supported; only {'type': 'text'} is.",
    ),
    (
        "UNSUPPORTED_CONTENT_TYPE",
        "messages[0].content[1]",
        {"kind": "input_{audio}", "path": "messages[0].content[1]", "supported": "'text'"},
        "Unsupported content part type 'input_{audio}' in 'messages[0].content[1]': this "
        "server accepts 'text' parts.",
    ),
    (
        "TOO_MANY_MESSAGES",
        "messages",
        {"count": 513, "limit": 512},
        "Too many messages: 513; this server accepts at most 512 per request.",
    ),
    (
        "TOO_MANY_PROMPTS",
        "prompt",
        {"count": 17, "limit": 16},
        "Too many prompts: 17; this server accepts at most 16 per request.",
    ),
    (
        "TEXT_TOO_LONG",
        "messages[3].content",
        {"limit": 1_000_000},
        "The messages hold more than 1000000 characters of text; shorten them.",
    ),
    (
        "TOO_MANY_IMAGES",
        P,
        {"limit": 16},
        "Too many images: this server accepts at most 16 per request.",
    ),
    (
        "TOO_MANY_PIXELS",
        P,
        {"limit": 200_000_000},
        "The images of this request hold more than 200000000 pixels in all; send fewer or "
        "smaller images.",
    ),
    (
        "TOO_MANY_VIDEOS",
        P,
        {"limit": 2},
        "Too many videos: this server accepts at most 2 per request.",
    ),
    (
        "INVALID_VIDEO_URL",
        P,
        {"message": "The video URL has no host."},
        "The video URL has no host.",
    ),
    (
        "VIDEO_URL_FORBIDDEN",
        P,
        {"message": "The video URL is not allowed: the port is not valid."},
        "The video URL is not allowed: the port is not valid.",
    ),
    (
        "VIDEO_FETCH_FAILED",
        P,
        {"reason": "more than 3 redirects"},
        "The video could not be fetched: more than 3 redirects.",
    ),
    (
        "VIDEO_FETCH_TIMEOUT",
        P,
        {"seconds": 60.0},
        "Fetching the video took longer than 60 s.",
    ),
    (
        "INVALID_VIDEO",
        P,
        {"message": "Invalid base64 video data."},
        "Invalid base64 video data.",
    ),
    (
        "VIDEO_TOO_LARGE",
        P,
        {"message": "The video is larger than this server's limit of 100 bytes."},
        "The video is larger than this server's limit of 100 bytes.",
    ),
    (
        "INVALID_IMAGE_URL",
        P,
        {"message": "The image URL has no host."},
        "The image URL has no host.",
    ),
    (
        "IMAGE_URL_FORBIDDEN",
        P,
        {"message": "The image URL is not allowed: URLs with credentials are not fetched."},
        "The image URL is not allowed: URLs with credentials are not fetched.",
    ),
    (
        "IMAGE_FETCH_FAILED",
        P,
        {"reason": "the host name could not be resolved"},
        "The image could not be fetched: the host name could not be resolved.",
    ),
    (
        "IMAGE_FETCH_TIMEOUT",
        P,
        {"seconds": 20.0},
        "Fetching the image took longer than 20 s.",
    ),
    (
        "INVALID_IMAGE",
        P,
        {"message": "Invalid base64 image data."},
        "Invalid base64 image data.",
    ),
    (
        "IMAGE_TOO_LARGE",
        P,
        {"message": "The image is larger than this server's limit of 1024 bytes."},
        "The image is larger than this server's limit of 1024 bytes.",
    ),
    (
        "IMAGE_TOO_SMALL",
        P,
        {"width": 1, "height": 3, "min_side": 2},
        "The image is 1x3 pixels; both sides must be at least 2 pixels.",
    ),
    (
        "IMAGE_ASPECT_RATIO_TOO_LARGE",
        P,
        {"width": 10_000, "height": 1, "limit": 200.0},
        "The image is 10000x1 pixels; its aspect ratio must be at most 200:1.",
    ),
    (
        "BACKEND_UNAVAILABLE",
        None,
        {},
        "The inference backend is unavailable; retry later.",
    ),
    ("SERVER_BUSY", None, {}, "The model is at capacity; retry shortly."),
    (
        "MODEL_UNAVAILABLE",
        None,
        {},
        "The model is not available right now (restarting or reloading); retry shortly.",
    ),
    ("MODEL_NOT_READY", None, {}, "The model is not ready to serve requests."),
    (
        "MODEL_NOT_LOADED",
        None,
        {},
        "model not loaded yet (lazy loading: the first request loads it)",
    ),
    (
        "MODEL_LOADING",
        None,
        {"timeout_s": 300.0},
        "The model is still loading after 300 s; retry later.",
    ),
    ("MODEL_LOAD_FAILED", None, {}, "The model could not be loaded; retry later."),
    (
        "CONTEXT_LENGTH_EXCEEDED",
        "max_tokens",
        {"message": "prompt is 9000 tokens"},
        "prompt is 9000 tokens",
    ),
    (
        "INTERNAL_ERROR",
        None,
        {"request_id": "r1"},
        "internal server error (request id r1)",
    ),
    (
        "STATE_DISABLED",
        None,
        {"what": "files"},
        "This server runs without stored state (--no-state): files are not available.",
    ),
    ("NO_SUCH_OBJECT", "file_id", {"kind": "File", "id": "file-x"}, "No such File object: file-x"),
    (
        "FILE_TOO_LARGE",
        "file",
        {"limit": 10},
        "The file is larger than this server's limit of 10 bytes.",
    ),
    ("RESPONSE_NOT_FOUND", None, {"id": "resp_x"}, "Response with id 'resp_x' not found."),
    (
        "PREVIOUS_RESPONSE_NOT_FOUND",
        "previous_response_id",
        {"id": "resp_x"},
        "Previous response with id 'resp_x' not found.",
    ),
    (
        "CONVERSATION_TOO_LONG",
        "previous_response_id",
        {"max_turns": 256, "max_bytes": 1024},
        "The conversation before this response is longer than this server continues: at most "
        "256 turns and 1024 bytes (--responses-max-history-turns, --responses-max-history-bytes). "
        "Start a new conversation with what it needs in 'input'.",
    ),
    (
        "RESPONSE_NOT_CANCELLABLE",
        None,
        {"message": "Cannot cancel a synchronous response."},
        "Cannot cancel a synchronous response.",
    ),
    (
        "BACKGROUND_INTERRUPTED",
        None,
        {},
        "The server running this background response stopped before it finished; create the "
        "response again.",
    ),
    (
        "BATCH_NOT_CANCELLABLE",
        "batch_id",
        {"status": "completed"},
        "The batch is completed: only a validating or in-progress batch can be cancelled.",
    ),
    (
        "INVALID_JSON_LINE",
        None,
        {"line": 3, "reason": "it is not valid JSON"},
        "Line 3 is not a JSON object: it is not valid JSON.",
    ),
    (
        "INVALID_BATCH_LINE",
        "method",
        {"message": 'Line 2: method must be POST, not "GET".'},
        'Line 2: method must be POST, not "GET".',
    ),
    (
        "BATCH_LINE_TOO_LARGE",
        None,
        {"line": 4, "limit": 10},
        "Line 4 is larger than 10 bytes, the largest request this server accepts "
        "(--max-request-bytes).",
    ),
    (
        "LINE_ATTEMPTS_EXHAUSTED",
        None,
        {"attempts": 3},
        "The request was started 3 times without an answer (the server stopped each time); it "
        "is not tried again.",
    ),
    (
        "BATCH_EXPIRED",
        None,
        {},
        "This request could not be executed before the completion window expired.",
    ),
    (
        "DUPLICATE_CUSTOM_ID",
        "custom_id",
        {"custom_id": '"a"', "line": 3, "first": 1},
        'The custom_id "a" of line 3 is also the custom_id of line 1; custom_id must be unique '
        "within a batch.",
    ),
    ("EMPTY_FILE", None, {}, "The input file has no requests."),
    (
        "BATCH_TOO_LARGE",
        None,
        {"limit": 5},
        "The input file has more than 5 requests, the most one batch may hold (--batch-max-lines).",
    ),
    (
        "INPUT_FILE_NOT_FOUND",
        None,
        {"file_id": "file-x"},
        "The input file file-x was deleted before the batch was validated.",
    ),
    (
        "LORA_ALREADY_LOADED",
        "lora_name",
        {"name": "sql"},
        "The lora adapter 'sql' has already been loaded.",
    ),
    (
        "INVALID_LORA_PATH",
        "lora_path",
        {"reason": "it has a '..' component"},
        "lora_path must be a directory path under the model's adapter roots: it has a '..' "
        "component.",
    ),
    (
        "INVALID_LORA_NAME",
        "lora_name",
        {"rule": "1 to 128 letters"},
        "lora_name must be 1 to 128 letters.",
    ),
    (
        "MODEL_REQUEST_ERROR",
        "stop",
        {"message": "'stop' takes at most 4 strings"},
        "'stop' takes at most 4 strings",
    ),
]


def test_every_entry_has_a_message_case():
    assert sorted(name for name, *_ in MESSAGES) == sorted(ENTRIES)


@pytest.mark.parametrize("name, param, fields, message", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_each_template_formats_the_fields_its_sites_pass(name, param, fields, message):
    entry = ENTRIES[name]
    assert entry.fields == set(fields)
    error = entry(param, **fields)
    assert error.envelope() == {
        "error": {"message": message, "type": entry.type, "param": param, "code": entry.code}
    }
    assert error.status == entry.status


# ---- the metrics' causes ---------------------------------------------------------------

# What error_cause gave for each code before the catalogue (its code table, its word table,
# then the status); the catalogue keeps every one.
CAUSE_BEFORE_THE_CATALOGUE = [
    ("not_found", 404, "not_found"),
    ("method_not_allowed", 405, "not_found"),
    ("request_too_large", 413, "body_too_large"),
    ("internal_error", 500, "internal_error"),
    ("invalid_api_key", 401, "auth"),
    ("model_not_loaded", 503, "backend_unavailable"),
    ("model_loading", 503, "backend_unavailable"),
    ("backend_unavailable", 503, "backend_unavailable"),
    ("server_busy", 503, "overloaded"),
    ("model_unavailable", 503, "backend_unavailable"),
    ("model_load_failed", 503, "backend_unavailable"),
    ("image_url_forbidden", 400, "invalid_request"),
    ("invalid_image_url", 400, "invalid_request"),
    ("invalid_image", 400, "invalid_request"),
    ("invalid_unicode", 400, "invalid_request"),
    ("too_many_messages", 400, "invalid_request"),
    ("too_many_prompts", 400, "invalid_request"),
    ("text_too_long", 400, "invalid_request"),
    ("too_many_images", 400, "invalid_request"),
    ("image_too_large", 400, "invalid_request"),
    ("too_many_pixels", 400, "invalid_request"),
    ("image_too_small", 400, "invalid_request"),
    ("image_aspect_ratio_too_large", 400, "invalid_request"),
    ("image_fetch_failed", 400, "image_fetch"),
    ("image_fetch_timeout", 400, "image_fetch"),
    ("too_many_videos", 400, "invalid_request"),
    ("invalid_video", 400, "invalid_request"),
    ("video_too_large", 400, "invalid_request"),
    ("video_fetch_failed", 400, "image_fetch"),
    ("video_fetch_timeout", 400, "image_fetch"),
    ("invalid_video_url", 400, "invalid_request"),
    ("video_url_forbidden", 400, "invalid_request"),
    ("rate_limit_exceeded", 429, "rate_limited"),
    ("server_shutting_down", 503, "shutting_down"),
    ("request_timeout", 408, "timeout"),
    ("timeout", 504, "timeout"),
    ("model_not_found", 404, "not_found"),
    ("invalid_json", 400, "invalid_request"),
    ("invalid_body", 400, "invalid_request"),
    ("model_not_ready", 503, "backend_unavailable"),
    ("invalid_value", 400, "invalid_request"),
    ("unsupported_parameter", 400, "invalid_request"),
    ("invalid_type", 400, "invalid_request"),
    ("missing_required_parameter", 400, "invalid_request"),
    ("unsupported_content_type", 400, "invalid_request"),
    ("context_length_exceeded", 400, "invalid_request"),
    ("state_disabled", 501, "not_found"),
    ("file_too_large", 413, "body_too_large"),
    ("previous_response_not_found", 404, "not_found"),
    ("conversation_too_long", 400, "invalid_request"),
    ("response_not_cancellable", 400, "invalid_request"),
    ("background_interrupted", 500, "internal_error"),
    ("batch_not_cancellable", 400, "invalid_request"),
    ("invalid_json_line", 400, "invalid_request"),
    ("invalid_batch_line", 400, "invalid_request"),
    ("batch_line_too_large", 413, "body_too_large"),
    ("line_attempts_exhausted", 500, "internal_error"),
    ("batch_expired", 504, "timeout"),
    ("duplicate_custom_id", 400, "invalid_request"),
    ("empty_file", 400, "invalid_request"),
    ("batch_too_large", 400, "invalid_request"),
    ("input_file_not_found", 400, "not_found"),
    ("lora_already_loaded", 400, "invalid_request"),
    ("invalid_lora_path", 400, "invalid_request"),
    ("invalid_lora_name", 400, "invalid_request"),
    (None, 400, "invalid_request"),
]


@pytest.mark.parametrize("code, status, cause", CAUSE_BEFORE_THE_CATALOGUE)
def test_error_cause_is_what_it_was(code, status, cause):
    assert error_cause(status, code) == cause
    if code is not None:
        assert (CATALOGUE[code].status, CATALOGUE[code].cause) == (status, cause)


def test_every_code_has_its_cause_pinned_above():
    assert {code for code, _, _ in CAUSE_BEFORE_THE_CATALOGUE} - {None} == set(CATALOGUE)


@pytest.mark.parametrize(
    "status, code, cause",
    [
        (503, "server_overloaded", "backend_unavailable"),
        (429, "queue_at_capacity", "rate_limited"),
        (403, None, "auth"),
        (418, "teapot", "invalid_request"),
        (507, None, "internal_error"),
    ],
)
def test_unknown_codes_count_by_their_status(status, code, cause):
    assert error_cause(status, code) == cause


# ---- the model's errors ----------------------------------------------------------------


def model_request_error_codes() -> set[str]:
    """The codes the model's source puts on its RequestErrors (third argument or code=)."""
    codes = set()
    for path in MODEL_CODE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "RequestError"):
                continue
            candidates = node.args[2:3] + [k.value for k in node.keywords if k.arg == "code"]
            codes |= {c.value for c in candidates if isinstance(c, ast.Constant) and c.value}
    return codes


def test_every_code_the_model_reports_is_catalogued():
    codes = model_request_error_codes()
    assert "context_length_exceeded" in codes  # the scan finds them
    assert codes <= set(MODEL_ERRORS)
    assert all(entry.status == 400 for entry in MODEL_ERRORS.values())


@pytest.mark.parametrize("code", [*sorted(MODEL_ERRORS), None, "a_newer_models_code"])
def test_the_models_errors_keep_its_words_and_take_the_catalogues_status(code):
    error = client_error(ModelError("invalid_request", "image 3: bad", "messages[0]", code))
    entry = MODEL_ERRORS.get(code or "", MODEL_REQUEST_ERROR)
    assert (error.status, error.type) == (entry.status, entry.type)
    assert (error.message, error.param, error.code) == ("image 3: bad", "messages[0]", code)
    assert error_cause(error.status, error.code) == "invalid_request"
