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
    "PROXY_MODEL_MAP",
    "PROXY_MAX_TOKENS_LIMIT",
    "PROXY_IMAGE_MIN_PIXELS",
    "PROXY_IMAGE_MAX_PIXELS",
    "PROXY_IMAGE_FETCH",
    "PROXY_IMAGE_FETCH_ALLOWED_DOMAINS",
    "PROXY_IMAGE_FETCH_ALLOW_PRIVATE_HOSTS",
    "PROXY_IMAGE_FETCH_MAX_BYTES",
    "PROXY_IMAGE_FETCH_CONNECT_TIMEOUT_S",
    "PROXY_IMAGE_FETCH_TIMEOUT_S",
    "PROXY_IMAGE_FETCH_CONCURRENCY",
    "PROXY_LAZY_LOAD",
    "PROXY_LOAD_TIMEOUT_S",
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
        model_map=(),
        max_request_bytes=64 * 1024 * 1024,
        max_tokens_limit=8192,
        image_min_pixels=3136,
        image_max_pixels=1003520,
        image_fetch=True,
        image_fetch_allowed_domains=(),
        image_fetch_allow_private_hosts=(),
        image_fetch_max_bytes=20 * 1024 * 1024,
        image_fetch_connect_timeout_s=5.0,
        image_fetch_timeout_s=20.0,
        image_fetch_concurrency=4,
        lazy_load=False,
        load_timeout_s=600.0,
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


def test_new_settings_from_environment(monkeypatch):
    monkeypatch.setenv("PROXY_MODEL_MAP", "alias=qwen2_5_vl, small = qwen_small")
    monkeypatch.setenv("PROXY_MAX_TOKENS_LIMIT", "2048")
    monkeypatch.setenv("PROXY_IMAGE_MIN_PIXELS", "784")
    monkeypatch.setenv("PROXY_IMAGE_MAX_PIXELS", "200704")
    monkeypatch.setenv("PROXY_IMAGE_FETCH", "off")
    monkeypatch.setenv("PROXY_IMAGE_FETCH_ALLOWED_DOMAINS", "*.Example.org, cdn.test.")
    monkeypatch.setenv("PROXY_IMAGE_FETCH_ALLOW_PRIVATE_HOSTS", "127.0.0.1,[::1],LocalHost")
    monkeypatch.setenv("PROXY_IMAGE_FETCH_MAX_BYTES", "1000")
    monkeypatch.setenv("PROXY_IMAGE_FETCH_CONNECT_TIMEOUT_S", "1.5")
    monkeypatch.setenv("PROXY_IMAGE_FETCH_TIMEOUT_S", "3")
    monkeypatch.setenv("PROXY_IMAGE_FETCH_CONCURRENCY", "2")
    monkeypatch.setenv("PROXY_LAZY_LOAD", "yes")
    monkeypatch.setenv("PROXY_LOAD_TIMEOUT_S", "30")
    config = parse_config([])
    assert config.model_map == (("alias", "qwen2_5_vl"), ("small", "qwen_small"))
    assert config.served_models == {
        "qwen2.5-vl-7b-instruct": "qwen2_5_vl",
        "alias": "qwen2_5_vl",
        "small": "qwen_small",
    }
    assert (config.max_tokens_limit, config.image_min_pixels, config.image_max_pixels) == (
        2048,
        784,
        200704,
    )
    assert config.image_fetch is False
    assert config.image_fetch_allowed_domains == ("example.org", "cdn.test")
    assert config.image_fetch_allow_private_hosts == ("127.0.0.1", "::1", "localhost")
    assert (config.image_fetch_max_bytes, config.image_fetch_concurrency) == (1000, 2)
    assert (config.image_fetch_connect_timeout_s, config.image_fetch_timeout_s) == (1.5, 3.0)
    assert (config.lazy_load, config.load_timeout_s) == (True, 30.0)


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--lazy-load"], "lazy_load", True),
        (["--lazy-load", "false"], "lazy_load", False),
        (["--no-image-fetch"], "image_fetch", False),
        (["--image-fetch"], "image_fetch", True),
        (["--image-fetch=0"], "image_fetch", False),
        (["--max-tokens-limit", "0"], "max_tokens_limit", 0),
        (
            ["--image-fetch-allow-private-hosts", "127.0.0.1"],
            "image_fetch_allow_private_hosts",
            ("127.0.0.1",),
        ),
        (["--model-map", ""], "model_map", ()),
    ],
)
def test_new_flags(argv, field, value):
    assert getattr(parse_config(argv), field) == value


def test_flag_beats_environment_for_booleans(monkeypatch):
    monkeypatch.setenv("PROXY_IMAGE_FETCH", "true")
    assert parse_config(["--no-image-fetch"]).image_fetch is False
    monkeypatch.setenv("PROXY_LAZY_LOAD", "1")
    assert parse_config(["--lazy-load", "no"]).lazy_load is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--model-map", "no-equals-sign"],
        ["--model-map", "a=b,a=c"],
        ["--model-map", "=b"],
        ["--model-map", "qwen2.5-vl-7b-instruct=other"],  # would shadow the default name
        ["--image-min-pixels", "2000000"],  # above the default max
        ["--image-max-pixels", "0"],
        ["--max-tokens-limit", "-1"],
        ["--image-fetch-timeout-s", "0"],
        ["--image-fetch-concurrency", "0"],
        ["--lazy-load", "maybe"],
        ["--image-fetch", "--no-image-fetch"],
    ],
)
def test_bad_new_values_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        parse_config(argv)


def test_bad_boolean_environment_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("PROXY_LAZY_LOAD", "sometimes")
    with pytest.raises(SystemExit):
        parse_config([])
    assert "--lazy-load" in capsys.readouterr().err
