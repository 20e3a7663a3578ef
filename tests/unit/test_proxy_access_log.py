"""The request log line (text and JSON), error causes, and the logging/metrics flags."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from proxy.config import parse_config
from proxy.observability.logs import JsonFormatter, configure_logging, make_formatter
from proxy.observability.metrics import CAUSES, error_cause
from proxy.observability.observe import RequestLine

ENV_VARS = ("PROXY_LOG_FORMAT", "PROXY_METRICS_REQUIRE_AUTH", "PROXY_LOG_LEVEL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# ---- flags -----------------------------------------------------------------------------


def test_log_format_defaults_to_text_and_metrics_to_no_auth():
    config = parse_config([]).server
    assert config.log_format == "text"
    assert config.metrics_require_auth is False


def test_flags_and_environment(monkeypatch):
    assert parse_config(["--log-format", "json"]).server.log_format == "json"
    assert parse_config(["--metrics-require-auth"]).server.metrics_require_auth is True
    monkeypatch.setenv("PROXY_LOG_FORMAT", "JSON")
    monkeypatch.setenv("PROXY_METRICS_REQUIRE_AUTH", "true")
    config = parse_config([]).server
    assert config.log_format == "json" and config.metrics_require_auth is True
    assert parse_config(["--log-format=text"]).server.log_format == "text"  # the flag wins


@pytest.mark.parametrize("argv, env", [(["--log-format", "yaml"], None), ([], "xml")])
def test_unknown_log_format_is_a_usage_error(monkeypatch, capsys, argv, env):
    if env:
        monkeypatch.setenv("PROXY_LOG_FORMAT", env)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    assert "--log-format" in capsys.readouterr().err


# ---- error causes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, code, cause",
    [
        (400, "invalid_json", "invalid_request"),
        (400, "invalid_image", "invalid_request"),
        (400, "image_url_forbidden", "invalid_request"),
        (400, None, "invalid_request"),
        (400, "image_fetch_timeout", "image_fetch"),
        (400, "image_fetch_failed", "image_fetch"),
        (400, "image_too_large", "invalid_request"),
        (400, "image_aspect_ratio_too_large", "invalid_request"),
        (400, "text_too_long", "invalid_request"),
        (400, "too_many_images", "invalid_request"),
        (404, "model_not_found", "not_found"),
        (404, "not_found", "not_found"),
        (405, "method_not_allowed", "not_found"),
        (413, "request_too_large", "body_too_large"),
        (500, "internal_error", "internal_error"),
        (503, "backend_unavailable", "backend_unavailable"),
        (503, "model_not_ready", "backend_unavailable"),
        (503, "model_loading", "backend_unavailable"),
        (503, "model_not_loaded", "backend_unavailable"),
        (503, "model_load_failed", "backend_unavailable"),
        (503, "model_unavailable", "backend_unavailable"),
        (503, "server_shutting_down", "shutting_down"),
        (429, "rate_limit_exceeded", "rate_limited"),
        (408, "request_timeout", "timeout"),
        (504, "timeout", "timeout"),
        (401, "invalid_api_key", "auth"),
        (503, "server_busy", "overloaded"),
        # Codes proxy/error_catalogue.py does not know (none the proxy raises): by status.
        (403, None, "auth"),
        (429, "too_many_requests", "rate_limited"),
        (503, "server_overloaded", "backend_unavailable"),
        (429, "queue_at_capacity", "rate_limited"),
        (504, "generation_timeout", "timeout"),
        (503, "request_timed_out", "backend_unavailable"),
        (408, None, "timeout"),
        (413, "payload_too_large", "body_too_large"),
        (413, None, "body_too_large"),
        (418, "teapot", "invalid_request"),
        (507, None, "internal_error"),
        (502, None, "backend_unavailable"),
    ],
)
def test_error_cause(status, code, cause):
    assert error_cause(status, code) == cause
    assert cause in CAUSES


# ---- the line --------------------------------------------------------------------------

FIELDS = {
    "request_id": "abc",
    "method": "POST",
    "path": "/v1/chat/completions",
    "route": "/v1/chat/completions",
    "status": 200,
    "model": "qwen",
    "stream": True,
    "prompt_tokens": 12,
    "completion_tokens": 3,
    "image_tokens": None,
    "ttft_ms": 4.5,
    "duration_ms": 20.0,
}


def record_of(message, fields=None, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("proxy.access", logging.INFO, __file__, 1, message, (), exc_info)
    if fields is not None:
        record.fields = fields
    return record


def test_text_line():
    assert str(RequestLine(FIELDS)) == (
        "request abc POST /v1/chat/completions -> 200 route=/v1/chat/completions model=qwen "
        "stream=true prompt_tokens=12 completion_tokens=3 image_tokens=- ttft_ms=4.5 "
        "duration_ms=20.0"
    )


def test_json_line_has_the_fields_at_top_level():
    entry = json.loads(JsonFormatter().format(record_of(RequestLine(FIELDS), FIELDS)))
    assert entry.pop("time").endswith("+00:00")
    assert entry == {"level": "INFO", "logger": "proxy.access", "message": "request", **FIELDS}


def test_json_other_lines_keep_their_message_and_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = record_of("something failed: 中文", exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "something failed: 中文"
    assert "ValueError: boom" in entry["exception"]


def test_configure_logging_installs_one_root_handler(monkeypatch):
    root = logging.getLogger()
    # pytest's own capture handlers stay out of reach (basicConfig(force=True) closes them).
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("WARNING", "json")
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert root.level == logging.WARNING
    configure_logging("INFO", "text")
    assert len(root.handlers) == 1
    assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    assert root.level == logging.INFO
    with pytest.raises(ValueError):
        make_formatter("yaml")
