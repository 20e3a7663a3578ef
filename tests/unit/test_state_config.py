"""The state settings (proxy/state/settings.py, the `state` rows of proxy/config.py) and the
API keys that make tenants (proxy/serving/auth.py)."""

from __future__ import annotations

import pytest

from proxy.config import parse_config
from proxy.serving.auth import APIKeyError, api_keys, read_api_key
from proxy.serving.hardening import describe_limits
from proxy.state.settings import StateSettings, default_state_dir


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("PROXY_STATE_DIR", "PROXY_DATABASE_URL", "PROXY_API_KEY", "PROXY_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_the_state_dir_is_under_the_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == str(tmp_path / "qwen-vl-proxy")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == str(tmp_path / "home/.local/state/qwen-vl-proxy")


def test_the_database_is_the_sqlite_file_unless_a_url_is_given(tmp_path):
    config = parse_config(["--state-dir", str(tmp_path)])
    assert config.state.url == f"sqlite:///{tmp_path / 'state.sqlite3'}"
    url = "postgresql://proxy:hunter2@db:5432/state"
    config = parse_config(["--state-dir", str(tmp_path), "--database-url", url])
    assert config.state.url == url
    assert config.state.shown_url == "postgresql://proxy:***@db:5432/state"
    assert "hunter2" not in repr(config)  # the config may be logged


def test_a_database_url_of_another_engine_is_a_usage_error_without_its_password(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--database-url", "mysql://proxy:hunter2@db/state"])
    error = capsys.readouterr().err
    assert "--database-url" in error and "hunter2" not in error


def test_expiry_is_the_retention_or_a_shorter_ttl():
    settings = StateSettings(state_retention_s=100.0)
    assert settings.expires_at(1000.0) == 1100.0
    assert settings.expires_at(1000.0, ttl_s=10.0) == 1010.0
    assert settings.expires_at(1000.0, ttl_s=500.0) == 1100.0  # never beyond the retention
    forever = StateSettings(state_retention_s=0.0)
    assert forever.expires_at(1000.0) is None
    assert forever.expires_at(1000.0, ttl_s=10.0) == 1010.0


def test_several_api_keys_from_the_flag_or_a_file(tmp_path):
    assert api_keys(read_api_key(" a , b,a ", "")) == ("a", "b")  # duplicates once
    key_file = tmp_path / "keys"
    key_file.write_text("# team A\nkey-one\n\n  key-two  \n")
    assert api_keys(read_api_key("", str(key_file))) == ("key-one", "key-two")
    assert parse_config(["--api-key-file", str(key_file)]).server.api_key == "key-one,key-two"
    assert api_keys("") == ()


@pytest.mark.parametrize("key, text", [("a,,b", ""), ("", "# only a comment\n"), ("", "a,b\n")])
def test_unusable_keys_are_startup_errors(tmp_path, key, text):
    key_file = ""
    if text:
        key_file = str(tmp_path / "keys")
        (tmp_path / "keys").write_text(text)
    with pytest.raises(APIKeyError):
        read_api_key(key, key_file)


def test_the_startup_block_counts_the_keys():
    assert "API key: required (2 keys)" in describe_limits(parse_config(["--api-key", "a,b"]))
    assert "API key: not required" in describe_limits(parse_config([]))
