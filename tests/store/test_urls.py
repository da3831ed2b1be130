"""The Redis URL forms (budgeter/store/urls.py): the Sentinel form parsed and formatted
(round trip), bad URLs refused with a clear message, passwords never in a log line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgeter.settings import SettingsError, load_settings
from budgeter.store.urls import (
    DEFAULT_SENTINEL_PORT,
    RedisURLError,
    SentinelURL,
    check_redis_url,
    redacted_url,
)

hosts = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    st.sampled_from(["::1", "fe80::1", "2001:db8::7"]),
)
secrets = st.text(min_size=0, max_size=20)  # any character: percent-encoded when formatted
names = st.text(min_size=1, max_size=20)


@given(
    sentinels=st.lists(st.tuples(hosts, st.integers(1, 65535)), min_size=1, max_size=4),
    master=names,
    db=st.integers(0, 15),
    username=st.none() | names,
    password=st.none() | secrets,
    sentinel_username=st.none() | secrets,
    sentinel_password=st.none() | secrets,
)
def test_format_then_parse_is_the_same_url(
    sentinels: list[tuple[str, int]],
    master: str,
    db: int,
    username: str | None,
    password: str | None,
    sentinel_username: str | None,
    sentinel_password: str | None,
) -> None:
    url = SentinelURL(
        sentinels=tuple(sentinels),
        master=master,
        db=db,
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
    )
    text = url.format()
    assert SentinelURL.parse(text) == url
    assert check_redis_url(text) == text
    shown = redacted_url(text)
    assert "?" not in shown
    if password:
        assert f":{password}@" not in shown


def test_the_written_forms() -> None:
    url = SentinelURL.parse("redis+sentinel://app:p%40ss@s1,s2:26380,[::1]:5/mymaster/2")
    assert url.sentinels == (("s1", DEFAULT_SENTINEL_PORT), ("s2", 26380), ("::1", 5))
    assert (url.master, url.db, url.username, url.password) == ("mymaster", 2, "app", "p@ss")
    assert url.sentinel_password is None
    plain = SentinelURL.parse("redis+sentinel://10.0.0.1:26379/main")
    assert (plain.db, plain.username, plain.password) == (0, None, None)
    auth = SentinelURL.parse(
        "redis+sentinel://:pw@h/m?sentinel_username=sent&sentinel_password=s%2Fp"
    )
    assert (auth.username, auth.password) == (None, "pw")
    assert (auth.sentinel_username, auth.sentinel_password) == ("sent", "s/p")
    raw = SentinelURL.parse("redis+sentinel://u:a/b@c@h/m")  # unencoded "/" and "@"
    assert (raw.password, raw.sentinels, raw.master) == ("a/b@c", (("h", 26379),), "m")


def test_passwords_are_not_in_the_repr() -> None:
    url = SentinelURL.parse("redis+sentinel://u:hunter2@h/m?sentinel_password=hunter3")
    assert "hunter2" not in repr(url) and "hunter3" not in repr(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://", "at least one Sentinel"),
        ("redis+sentinel://h:1", "/<master name>"),
        ("redis+sentinel://h:1/", "/<master name>"),
        ("redis+sentinel://h:0/m", "1-65535"),
        ("redis+sentinel://h:x/m", "1-65535"),
        ("redis+sentinel://h,,k/m", "no host"),
        ("redis+sentinel://[::1/m", "bad Sentinel address"),
        ("redis+sentinel://h/m/zero", "bad db"),
        ("redis+sentinel://h/m?socket_timeout=1", "unknown option 'socket_timeout'"),
        ("http://h/m", "must start with redis://"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message.replace("[", r"\[").replace("?", r"\?")):
        check_redis_url(url)


def test_settings_take_every_form_and_refuse_a_bad_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in (
        "redis://u:p@h:6379/0",
        "rediss://h:6380/0",
        "unix:///run/redis.sock",
        "redis+cluster://h:7000",
        "redis+sentinel://:pw@h1,h2:26380/mymaster/1?sentinel_password=x",
    ):
        monkeypatch.setenv("BUDGETER_REDIS_URL", url)
        assert load_settings().redis_url == url
    monkeypatch.setenv("BUDGETER_REDIS_URL", "redis+sentinel://:topsecret@h:1")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "BUDGETER_REDIS_URL" in str(refused.value) and "topsecret" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/2", "redis://host:6379/2"),
        ("rediss://user:s3cret@host:6380/0", "rediss://user@host:6380/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock?password=s3cret&db=1", "unix:///run/redis.sock"),
        ("redis+cluster://u:s3cret@h:7000", "redis+cluster://u@h:7000"),
        (
            "redis+sentinel://app:s3cret@s1:26379,s2:26379/mymaster/1?sentinel_password=s3cret",
            "redis+sentinel://app@s1:26379,s2:26379/mymaster/1",
        ),
        ("redis+sentinel://:s3/cr@et@h/m", "redis+sentinel://h/m"),
    ],
)
def test_redacted_urls_keep_no_password(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
