"""Settings from BUDGETER_* variables, and the embedded redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as sync_redis

from budgeter.settings import SettingsError, load_settings
from budgeter.store.embedded import EmbeddedRedis, find_redis_server


def test_settings_read_budgeter_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETER_REDIS_URL", "redis://127.0.0.1:6390/2")
    monkeypatch.setenv("BUDGETER_UPSTREAM_URL", "https://gateway.api.anyint.ai/anthropic/")
    monkeypatch.setenv("BUDGETER_UPSTREAM_API_KEY", "sk-secret")
    monkeypatch.setenv("BUDGETER_ADMIN_TOKEN", "admin-secret")
    settings = load_settings()
    assert settings.redis_url == "redis://127.0.0.1:6390/2"
    assert settings.upstream_url == "https://gateway.api.anyint.ai/anthropic"
    assert settings.upstream_api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(settings) and "admin-secret" not in repr(settings)


def test_unset_redis_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUDGETER_REDIS_URL", raising=False)
    assert load_settings().redis_url is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BUDGETER_REDIS_URL", "localhost:6379", "BUDGETER_REDIS_URL: Value error, must start"),
        ("BUDGETER_UPSTREAM_URL", "ftp://x", "BUDGETER_UPSTREAM_URL: Value error, must start"),
        ("BUDGETER_LEASE_SECONDS", "-1", "BUDGETER_LEASE_SECONDS: Input should be greater"),
        ("BUDGETER_MAX_ATTEMPTS", "many", "BUDGETER_MAX_ATTEMPTS: Input should be a valid"),
        ("BUDGETER_LOG_FORMAT", "xml", "BUDGETER_LOG_FORMAT: Value error"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_embedded_redis_starts_and_stops(tmp_path: Path) -> None:
    assert find_redis_server()
    server = EmbeddedRedis(tmp_path / "data")
    url = server.start()
    try:
        client = sync_redis.Redis.from_url(url)
        assert client.ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        client.close()
    finally:
        server.stop()
    assert server.process is None
    assert (tmp_path / "data" / "appendonly.aof").exists()
