"""Proxy settings: the table of flags, defaults, environment fallbacks, flags overriding both,
and `with_settings`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import proxy.config
from proxy.config import (
    API_KEY_FILE_FLAG,
    SETTINGS,
    ProxyConfig,
    ServerSettings,
    build_parser,
    default_workers,
    env_names,
    parse_config,
    with_settings,
)
from proxy.media.fetch import FetchPolicy
from proxy.media.pixels import PixelLimits
from proxy.request.limits import RequestLimits
from proxy.serving.admission import AdmissionSettings

ROOT = Path(__file__).resolve().parents[2]
ROWS = {setting.key: setting for setting in SETTINGS}

# One value per row, as flag/env text and as parsed, none of them the default.
SAMPLES: dict[str, tuple[str, object]] = {
    "host": ("127.0.0.1", "127.0.0.1"),
    "port": ("9100", 9100),
    "triton_url": ("triton:8001", "triton:8001"),
    "triton_model": ("qwen_test", "qwen_test"),
    "served_model_name": ("my-model", "my-model"),
    "model_map": (
        "alias=qwen2_5_vl, small = qwen_small",
        (("alias", "qwen2_5_vl"), ("small", "qwen_small")),
    ),
    "max_request_bytes": ("1024", 1024),
    "request_body_timeout_s": ("2.5", 2.5),
    "max_messages": ("7", 7),
    "max_prompts": ("4", 4),
    "max_text_chars": ("100", 100),
    "max_images": ("3", 3),
    "max_image_bytes": ("4096", 4096),
    "max_image_source_pixels": ("1000000", 1_000_000),
    "min_image_side": ("7", 7),
    "max_image_aspect_ratio": ("50", 50.0),
    "max_request_pixels": ("5000000", 5_000_000),
    "max_videos": ("1", 1),
    "max_video_bytes": ("1000", 1000),
    "video_fetch_max_bytes": ("2000", 2000),
    "video_fetch_timeout_s": ("9", 9.0),
    "max_tools": ("8", 8),
    "max_schema_bytes": ("1024", 1024),
    "max_schema_depth": ("4", 4),
    "max_concurrent_requests": ("3", 3),
    "request_timeout_s": ("9.5", 9.5),
    "stream_idle_timeout_s": ("4", 4.0),
    "shutdown_timeout_s": ("12", 12.0),
    "api_key": (" s3cret ", "s3cret"),
    "admin_api_key": ("adm1n", "adm1n"),
    "routing": ("least-busy", "least-busy"),
    "max_tokens_limit": ("2048", 2048),
    "image_min_pixels": ("784", 784),
    "image_max_pixels": ("200704", 200704),
    "image_fetch": ("off", False),
    "image_fetch_allowed_domains": ("*.Example.org, cdn.test.", ("example.org", "cdn.test")),
    "image_fetch_allow_private_hosts": (
        "127.0.0.1,[::1],LocalHost",
        ("127.0.0.1", "::1", "localhost"),
    ),
    "image_fetch_max_bytes": ("1000", 1000),
    "image_fetch_connect_timeout_s": ("1.5", 1.5),
    "image_fetch_timeout_s": ("3", 3.0),
    "image_fetch_concurrency": ("2", 2),
    "lazy_load": ("yes", True),
    "load_timeout_s": ("30", 30.0),
    "log_level": ("debug", "DEBUG"),
    "log_format": ("JSON", "json"),
    "metrics_require_auth": ("true", True),
    "timings": ("true", True),
    "playground": ("on", True),  # the default is auto (None)
    "workers": ("7", 7),  # the default is at most 4
    "state": ("off", False),
    "state_dir": ("/var/lib/proxy-state", "/var/lib/proxy-state"),
    "database_url": ("postgresql://proxy@db/state", "postgresql://proxy@db/state"),
    "file_max_bytes": ("1048576", 1048576),
    "state_retention_s": ("0", 0.0),  # 0 = until deleted
    "state_sweep_interval_s": ("60", 60.0),
    "responses_max_history_turns": ("8", 8),
    "responses_max_history_bytes": ("1048576", 1048576),
    "batch_concurrency": ("3", 3),
    "batch_max_lines": ("1000", 1000),
    "batch_lease_s": ("2.5", 2.5),
    "batch_poll_s": ("0.2", 0.2),
    "batch_line_attempts": ("5", 5),
    "trace_otlp_endpoint": ("http://collector:4318", "http://collector:4318"),
    "trace_sample_ratio": ("0.1", 0.1),
    "trace_service_name": ("proxy-eu", "proxy-eu"),
    "decode_workers": ("3", 3),
    "decode_memory_mib": ("512", 512),
    "decode_cpu_s": ("5", 5),
    "decode_worker_tasks": ("1", 1),
    "decode_timeout_s": ("2.5", 2.5),
}

# A value each row's parser refuses (rows of free text have none).
BAD = {
    "port": "ninety",
    "model_map": "no-equals-sign",
    "max_request_bytes": "0",
    "request_body_timeout_s": "0",
    "max_messages": "-1",
    "max_prompts": "0",
    "max_text_chars": "many",
    "max_images": "-1",
    "max_image_bytes": "1.5",
    "max_image_source_pixels": "-1",
    "min_image_side": "0",
    "max_image_aspect_ratio": "0.5",  # positive, but below 1 (a parse_config check)
    "max_request_pixels": "0",
    "max_videos": "-1",
    "max_video_bytes": "0",
    "video_fetch_max_bytes": "0",
    "video_fetch_timeout_s": "0",
    "max_tools": "-1",
    "max_schema_bytes": "-1",
    "max_schema_depth": "deep",
    "max_concurrent_requests": "0",
    "request_timeout_s": "-1",
    "stream_idle_timeout_s": "nan",
    "shutdown_timeout_s": "0",
    "max_tokens_limit": "-1",  # an int, but negative (a parse_config check)
    "image_min_pixels": "-5",
    "image_max_pixels": "-1",
    "image_fetch": "maybe",
    "playground": "maybe",
    "image_fetch_max_bytes": "0",
    "image_fetch_connect_timeout_s": "0",
    "image_fetch_timeout_s": "0",
    "image_fetch_concurrency": "0",
    "lazy_load": "sometimes",
    "load_timeout_s": "0",
    "log_level": "verbose",
    "log_format": "yaml",
    "metrics_require_auth": "2",
    "routing": "round-robin",
    "timings": "sometimes",
    "workers": "0",
    "state": "perhaps",
    "database_url": "mysql://proxy@db/state",  # neither sqlite nor postgresql
    "file_max_bytes": "0",
    "state_retention_s": "-1",
    "state_sweep_interval_s": "0",
    "responses_max_history_turns": "0",
    "responses_max_history_bytes": "-5",
    "batch_concurrency": "64",  # not below --max-concurrent-requests (64): a parse_config check
    "batch_max_lines": "0",
    "batch_lease_s": "0",
    "batch_poll_s": "-1",
    "batch_line_attempts": "0",
    "trace_sample_ratio": "1.5",
    "decode_workers": "0",
    "decode_memory_mib": "-1",
    "decode_cpu_s": "0",
    "decode_worker_tasks": "0",
    "decode_timeout_s": "0",
}
FREE_TEXT = {"host", "triton_url", "triton_model", "served_model_name", "api_key", "state_dir"}
FREE_TEXT |= {"admin_api_key"}
FREE_TEXT |= {"image_fetch_allowed_domains", "image_fetch_allow_private_hosts"}
FREE_TEXT |= {"trace_otlp_endpoint", "trace_service_name"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in env_names():
        monkeypatch.delenv(name, raising=False)


def value_of(config: ProxyConfig, key: str) -> object:
    setting = ROWS[key]
    return getattr(getattr(config, setting.section), setting.name)


def as_text(value: object) -> str:
    """A default as flag text."""
    if value is None:
        return "auto"  # the one setting with an undecided default: --playground
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(item if isinstance(item, str) else "=".join(item) for item in value)
    return str(value)


# ---- the table -------------------------------------------------------------------------


def test_every_section_field_has_exactly_one_row():
    rows = sorted((setting.section, setting.name) for setting in SETTINGS)
    fields = sorted(
        (section.name, field.name)
        for section in dataclasses.fields(ProxyConfig)
        for field in dataclasses.fields(getattr(ProxyConfig(), section.name))
    )
    assert rows == fields


def test_no_flag_or_env_var_is_named_twice():
    options = [o for action in build_parser()._actions for o in action.option_strings]
    assert len(options) == len(set(options)), options
    envs = [setting.env_name for setting in SETTINGS] + ["PROXY_API_KEY_FILE"]
    assert len(envs) == len(set(envs)) == len(env_names())


def test_the_rule_names_flags_and_env_vars():
    # Explicit names are the exceptions, kept because deployments use them.
    explicit = {(s.key, s.flag, s.env) for s in SETTINGS if s.flag or s.env}
    assert explicit == {
        ("triton_url", "", "TRITON_GRPC_URL"),
        ("triton_model", "", "TRITON_MODEL"),
        ("served_model_name", "", "SERVED_MODEL_NAME"),
        ("image_fetch", "image-fetch", ""),
        ("state", "state", ""),  # --state / --no-state, not --enabled
        # the fetch section's video fields: --video-fetch-*, not --image-fetch-video-*
        ("video_fetch_max_bytes", "video-fetch-max-bytes", ""),
        ("video_fetch_timeout_s", "video-fetch-timeout-s", ""),
        # OpenTelemetry's own variables, which deployments set for every traced service
        ("trace_otlp_endpoint", "", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ("trace_sample_ratio", "", "OTEL_TRACES_SAMPLER_ARG"),
        ("trace_service_name", "", "OTEL_SERVICE_NAME"),
    }
    rows = {s.option: s for s in SETTINGS}
    assert rows["--image-fetch-max-bytes"].env_name == "PROXY_IMAGE_FETCH_MAX_BYTES"
    assert (rows["--image-fetch-max-bytes"].section, rows["--image-fetch-max-bytes"].name) == (
        "fetch",
        "max_bytes",
    )
    assert (rows["--image-min-pixels"].section, rows["--image-min-pixels"].name) == (
        "pixels",
        "min_pixels",
    )
    assert rows["--max-concurrent-requests"].section == "admission"
    assert rows["--image-fetch"].env_name == "PROXY_IMAGE_FETCH"


def test_every_help_names_its_env_var():
    for action in build_parser()._actions:
        setting = ROWS.get(action.dest)
        if setting is not None and action.option_strings == [setting.option]:
            assert action.help.endswith(f" [{setting.env_name}]"), action.help


def test_samples_and_bad_values_cover_the_table():
    assert set(SAMPLES) == set(ROWS)
    assert set(BAD) | FREE_TEXT == set(ROWS) and not set(BAD) & FREE_TEXT


# ---- defaults, env, flags --------------------------------------------------------------


def test_defaults_are_the_section_classes_defaults():
    config = parse_config([])
    assert config == ProxyConfig()
    assert config.server == ServerSettings()
    assert config.admission == AdmissionSettings()
    assert config.limits == RequestLimits()
    assert config.pixels == PixelLimits()
    assert config.fetch == FetchPolicy()


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (4, 2), (8, 4), (64, 4)])
def test_workers_default_to_one_per_core_up_to_four(monkeypatch, cores, workers):
    monkeypatch.setattr(proxy.config, "available_cores", lambda: cores)
    assert default_workers() == workers
    assert parse_config([]).server.workers == workers


def test_default_values():
    config = parse_config([])
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    assert (config.server.triton_url, config.server.triton_model) == (
        "localhost:8001",
        "qwen2_5_vl",
    )
    assert config.server.served_model_name == "qwen2.5-vl-7b-instruct"
    assert (config.server.max_tokens_limit, config.server.log_level) == (
        0,
        "INFO",
    )  # 0: the model's
    assert config.admission.max_request_bytes == 64 * 1024 * 1024
    assert (config.pixels.min_pixels, config.pixels.max_pixels) == (0, 0)  # the model's
    assert config.fetch.enabled is True and config.fetch.max_bytes == 20 * 1024 * 1024
    assert config.served_models == {"qwen2.5-vl-7b-instruct": "qwen2_5_vl"}


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_each_flag_parses(key):
    text, value = SAMPLES[key]
    config = parse_config([ROWS[key].option, text])
    assert value_of(config, key) == value
    # Only that setting changed.
    assert with_settings(config, **{key: value_of(ProxyConfig(), key)}) == ProxyConfig()


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_each_env_var_is_the_fallback(key, monkeypatch):
    text, value = SAMPLES[key]
    monkeypatch.setenv(ROWS[key].env_name, text)
    assert value_of(parse_config([]), key) == value


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_each_flag_beats_its_env_var(key, monkeypatch):
    monkeypatch.setenv(ROWS[key].env_name, SAMPLES[key][0])
    default = value_of(ProxyConfig(), key)
    assert value_of(parse_config([f"{ROWS[key].option}={as_text(default)}"]), key) == default


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_flag_values_are_usage_errors(key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config([f"{ROWS[key].option}={BAD[key]}"])
    assert exit_info.value.code == 2
    assert ROWS[key].option in capsys.readouterr().err


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_env_values_are_usage_errors(key, monkeypatch, capsys):
    monkeypatch.setenv(ROWS[key].env_name, BAD[key])
    with pytest.raises(SystemExit) as exit_info:
        parse_config([])
    assert exit_info.value.code == 2
    assert ROWS[key].option in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--lazy-load"], "lazy_load", True),
        (["--lazy-load", "false"], "lazy_load", False),
        (["--metrics-require-auth"], "metrics_require_auth", True),
        (["--no-image-fetch"], "image_fetch", False),
        (["--no-state"], "state", False),
        (["--playground"], "playground", True),
        (["--no-playground"], "playground", False),
        (["--playground", "auto"], "playground", None),
        (
            ["--database-url", "sqlite:////var/lib/state.db"],
            "database_url",
            "sqlite:////var/lib/state.db",
        ),
        (["--image-fetch"], "image_fetch", True),
        (["--image-fetch=0"], "image_fetch", False),
        (["--max-tokens-limit", "0"], "max_tokens_limit", 0),
        (["--model-map", ""], "model_map", ()),
        (["--image-min-pixels", "1003520"], "image_min_pixels", 1003520),  # min == max
    ],
)
def test_special_forms(argv, key, value):
    assert value_of(parse_config(argv), key) == value


def test_no_image_fetch_beats_the_environment(monkeypatch):
    monkeypatch.setenv("PROXY_IMAGE_FETCH", "true")
    assert parse_config(["--no-image-fetch"]).fetch.enabled is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--model-map", "a=b,a=c"],
        ["--model-map", "=b"],
        ["--model-map", "qwen2.5-vl-7b-instruct=other"],  # would shadow the default name
        ["--image-min-pixels", "5000", "--image-max-pixels", "4000"],
        ["--image-fetch", "--no-image-fetch"],
        ["--api-key", "a", API_KEY_FILE_FLAG, "/nonexistent"],
        [API_KEY_FILE_FLAG, "/nonexistent/key"],
        ["--log-level", "TRACE"],
    ],
)
def test_inconsistent_values_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2


def test_model_map_names_more_served_models(monkeypatch):
    monkeypatch.setenv("PROXY_MODEL_MAP", "alias=qwen2_5_vl, small = qwen_small")
    assert parse_config([]).served_models == {
        "qwen2.5-vl-7b-instruct": "qwen2_5_vl",
        "alias": "qwen2_5_vl",
        "small": "qwen_small",
    }


def test_config_is_frozen():
    config = parse_config([])
    with pytest.raises(AttributeError):
        config.server = ServerSettings()
    with pytest.raises(AttributeError):
        config.server.port = 1


# ---- with_settings ---------------------------------------------------------------------


def test_with_settings_takes_flag_names():
    base = ProxyConfig()
    config = with_settings(
        base, max_images=2, image_fetch=False, image_max_pixels=200704, lazy_load=True
    )
    assert config.limits == dataclasses.replace(base.limits, max_images=2)
    assert config.fetch == dataclasses.replace(base.fetch, enabled=False)
    assert config.pixels == dataclasses.replace(base.pixels, max_pixels=200704)
    assert config.server == dataclasses.replace(base.server, lazy_load=True)
    assert config.admission is base.admission  # sections not named are kept
    assert base == ProxyConfig()  # a new config; the old one is unchanged
    assert with_settings(base) == base


@pytest.mark.parametrize("name", ["max_image_pixels", "enabled", "fetch", "api_key_file", "bogus"])
def test_with_settings_rejects_unknown_names(name):
    with pytest.raises(TypeError, match=name):
        with_settings(ProxyConfig(), **{name: 1})


# ---- the documentation -----------------------------------------------------------------

_DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(
        path
        for path in (ROOT / "docker").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts  # compiled triton_launch.py
    ),
]
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*\b")
# Flags of other programs on lines that also name a proxy setting.
_NOT_PROXY_FLAGS = {"--rm": "docker run", "--exit-timeout-secs": "tritonserver"}


def test_documented_flags_and_env_vars_exist():
    """Lines of README.md, docs/ and docker/ that name a proxy env var or `python -m proxy`
    name only flags that exist; every PROXY_* variable they name is read by the proxy, but
    the compose file's own ${PROXY_*} substitutions."""
    options = {o for action in build_parser()._actions for o in action.option_strings}
    envs = env_names()
    texts = {path: path.read_text() for path in _DOCUMENTS}
    compose_variables = {
        name for text in texts.values() for name in re.findall(r"\$\{(PROXY_[A-Z0-9_]+)", text)
    }
    documented_flags: dict[str, str] = {}
    documented_envs: dict[str, str] = {}
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            names = set(_NAME.findall(line))
            for name in names:
                if name.startswith("PROXY_") and name != "PROXY_":  # not `PROXY_*`
                    documented_envs.setdefault(name, where)
            if names & envs or "python -m proxy" in line:
                for flag in _FLAG.findall(line):
                    documented_flags.setdefault(flag, where)
    missing_flags = {
        flag: where
        for flag, where in documented_flags.items()
        if flag not in options and flag not in _NOT_PROXY_FLAGS
    }
    assert not missing_flags, f"documented, but python -m proxy has no such flag: {missing_flags}"
    missing_envs = {
        name: where
        for name, where in documented_envs.items()
        if name not in envs and name not in compose_variables
    }
    assert not missing_envs, f"documented, but the proxy reads no such variable: {missing_envs}"
    # The check has teeth: the configuration tables are found.
    assert {"--max-concurrent-requests", "--image-fetch-allowed-domains"} <= set(documented_flags)


def test_pixel_bounds_at_odds_are_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--image-min-pixels", "5000", "--image-max-pixels", "4000"])
    assert "--image-min-pixels" in capsys.readouterr().err


def test_the_startup_limits_block_is_derived_from_the_flag_table():
    """Every limit flag shows with its value (a new one without an edit), model's at 0."""
    from proxy.config import SETTINGS
    from proxy.serving.hardening import describe_limits

    text = describe_limits(parse_config(["--max-images", "3", "--max-messages", "7"]))
    lines = {line.split()[0]: line.split()[1] for line in text.splitlines()[1:-1]}
    assert lines["--max-images"] == "3" and lines["--max-messages"] == "7"
    assert lines["--max-videos"] == "model's" and lines["--max-tools"] == "model's"
    limit_rows = [row for row in SETTINGS if row.section in ("limits", "admission", "pixels")]
    assert {row.option for row in limit_rows} <= set(lines)
