"""The shared embedded Redis (a detached redis-server per data dir, started once under a
file lock, stale url files replaced), the default data dir, and the one-line outage log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.settings import load_settings
from budgeter.store import outage
from budgeter.store.client import redacted_url
from budgeter.store.outage import RedisOutage, is_unreachable, log_failure
from budgeter.store.shared_redis import (
    PORT_FILE,
    URL_FILE,
    SharedRedis,
    format_url,
    parse_url,
    pid_alive,
    probe,
)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedRedis]:
    server = SharedRedis(tmp_path / "data")
    yield server
    server.stop()


def test_the_default_data_dir_is_per_user_never_the_current_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BUDGETER_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/xdg")
    assert load_settings().data_dir == Path("/srv/xdg/budgeter")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec: absolute only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_settings().data_dir == tmp_path / "home" / ".local" / "share" / "budgeter"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert load_settings().data_dir == tmp_path / "home" / ".local" / "share" / "budgeter"
    monkeypatch.setenv("BUDGETER_DATA_DIR", "~/elsewhere")
    assert load_settings().data_dir == tmp_path / "home" / "elsewhere"
    monkeypatch.setenv("BUDGETER_DATA_DIR", "rel")
    assert load_settings().data_dir == tmp_path / "rel"  # made absolute once, at start


def test_the_url_file_format_round_trips() -> None:
    for port in (1, 6379, 65535):
        assert parse_url(format_url(port) + "\n") == port
    for bad in ("", "redis://10.0.0.1:6379/0", "redis://127.0.0.1:0/0", "redis://127.0.0.1:x/0"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_a_shared_server_is_detached_reused_stopped_and_restarted_on_its_port(
    shared: SharedRedis,
) -> None:
    server, started = shared.ensure()
    assert started
    assert os.getsid(server.pid) != os.getsid(0)  # its own session, no terminal's signals
    assert (shared.data_dir / URL_FILE).read_text() == server.url + "\n"
    assert probe(server.port, shared.data_dir) == server.pid
    assert shared.ensure() == (server, False)
    assert shared.running() == server

    assert shared.stop() == server
    assert not pid_alive(server.pid)
    assert not (shared.data_dir / URL_FILE).exists()
    assert (shared.data_dir / "dump.rdb").exists()  # SHUTDOWN SAVE
    assert shared.running() is None
    assert shared.stop() is None  # stopping a stopped server is fine

    again, started = shared.ensure()
    assert started and again.port == server.port and again.pid != server.pid
    assert (shared.data_dir / PORT_FILE).read_text() == f"{server.port}\n"


def test_processes_starting_together_start_one_server(shared: SharedRedis) -> None:
    code = (
        "import sys; from budgeter.store.shared_redis import SharedRedis; "
        "server, started = SharedRedis(sys.argv[1]).ensure(); print(server.pid, started)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(shared.data_dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    answers = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert len({pid for pid, _ in answers}) == 1
    assert sorted(started for _, started in answers) == ["False", "False", "False", "True"]


def test_a_stale_url_file_is_detected_and_replaced(shared: SharedRedis, redis_url: str) -> None:
    shared.data_dir.mkdir(parents=True)
    url_file = shared.data_dir / URL_FILE
    # a server answers on that port, but it is another data dir's (the suite's own Redis)
    url_file.write_text(redis_url + "\n")
    assert shared.running() is None
    server, started = shared.ensure()
    assert started and server.url != redis_url
    assert probe(parse_url(redis_url), shared.data_dir) is None  # the other one is untouched

    # the server was SIGKILLed: its url file stays behind, its port is dead
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert url_file.exists() and shared.running() is None
    replaced, started = shared.ensure()
    assert started and replaced.port == server.port and replaced.pid != server.pid

    # a url file of nothing at all
    assert shared.stop() == replaced
    url_file.write_text("redis://127.0.0.1:1/0\n")
    assert shared.running() is None
    assert shared.ensure()[1]


def test_redacted_url_drops_passwords() -> None:
    assert redacted_url("redis://:s3cret@host:6379/2") == "redis://host:6379/2"
    assert redacted_url("rediss://user:s3cret@host:6380/0") == "rediss://user@host:6380/0"
    assert redacted_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redacted_url("unix:///run/redis.sock?password=s3cret&db=1") == "unix:///run/redis.sock"


def test_an_outage_is_one_warning_per_interval_and_one_line_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    state = RedisOutage(interval_s=5.0, clock=lambda: now[0])
    state.describe("redis://127.0.0.1:7/0")
    error = RedisConnectionError("Error 111 connecting to 127.0.0.1:7. Connection refused.")
    with caplog.at_level(logging.INFO, logger="budgeter.redis"):
        for step in range(50):  # 10 s of failures, 5 a second
            now[0] = 100.0 + step * 0.2
            state.unreachable(error)
        state.reachable()
        state.reachable()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Redis at redis://127.0.0.1:7/0 unreachable: Error 111 connecting to 127.0.0.1:7. "
        "Connection refused; retrying in 5 s",
    ] * 2 + ["Redis at redis://127.0.0.1:7/0 reachable again"]
    assert all(r.exc_info is None for r in caplog.records)


def test_log_failure_keeps_tracebacks_for_everything_but_redis_being_away(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(outage, "OUTAGE", RedisOutage())
    logger = logging.getLogger("budgeter.test")
    with caplog.at_level(logging.INFO):
        try:
            raise ValueError("a bug")
        except ValueError:
            log_failure(logger, "pick failed")
        try:
            try:
                raise RedisConnectionError("Connection reset by peer")
            except RedisConnectionError as exc:
                raise RuntimeError("while picking") from exc
        except RuntimeError:
            log_failure(logger, "pick failed")
    first, second = caplog.records
    assert (first.levelname, first.getMessage(), first.exc_info is not None) == (
        "ERROR",
        "pick failed",
        True,
    )
    assert second.levelname == "WARNING" and second.exc_info is None
    assert "unreachable: Connection reset by peer" in second.getMessage()
    assert is_unreachable(TimeoutError()) is False and is_unreachable(ConnectionResetError())
