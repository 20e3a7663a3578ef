"""Proxy settings: defaults, environment fallbacks, and flags overriding both."""

from __future__ import annotations

import pytest

from proxy.config import ProxyConfig, parse_config

ENV_VARS = (
    "PROXY_HOST",
    "PROXY_PORT",
    "TRITON_GRPC_URL",
    "TRITON_MODEL",
    "SERVED_MODEL_NAME",
    "PROXY_MAX_REQUEST_BYTES",
    "PROXY_LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    assert parse_config([]) == ProxyConfig(
        host="0.0.0.0",
        port=9000,
        triton_url="localhost:8001",
        triton_model="qwen2_5_vl",
        served_model_name="qwen2.5-vl-7b-instruct",
        max_request_bytes=64 * 1024 * 1024,
        log_level="INFO",
    )


def test_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("PROXY_HOST", "127.0.0.1")
    monkeypatch.setenv("PROXY_PORT", "9100")
    monkeypatch.setenv("TRITON_GRPC_URL", "triton:8001")
    monkeypatch.setenv("TRITON_MODEL", "qwen_test")
    monkeypatch.setenv("SERVED_MODEL_NAME", "my-model")
    monkeypatch.setenv("PROXY_MAX_REQUEST_BYTES", "1024")
    monkeypatch.setenv("PROXY_LOG_LEVEL", "debug")
    config = parse_config([])
    assert (config.host, config.port, config.triton_url) == ("127.0.0.1", 9100, "triton:8001")
    assert (config.triton_model, config.served_model_name) == ("qwen_test", "my-model")
    assert (config.max_request_bytes, config.log_level) == (1024, "DEBUG")


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PROXY_PORT", "9100")
    monkeypatch.setenv("SERVED_MODEL_NAME", "env-name")
    config = parse_config(["--port", "9200", "--served-model-name", "flag-name"])
    assert (config.port, config.served_model_name) == (9200, "flag-name")


def test_bad_environment_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("PROXY_PORT", "ninety")
    with pytest.raises(SystemExit):
        parse_config([])
    assert "--port" in capsys.readouterr().err


def test_non_positive_body_limit_is_rejected():
    with pytest.raises(SystemExit):
        parse_config(["--max-request-bytes", "0"])


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        parse_config([]).port = 1
