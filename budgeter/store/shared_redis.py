"""The shared embedded Redis: one detached redis-server per data directory.

With ``BUDGETER_REDIS_URL`` unset, every budgeter process of a user uses the same server,
whose data lives in ``BUDGETER_DATA_DIR``. The first process that finds none running
starts it, under a file lock (two processes starting together start one), detached: its
own session, daemonized, no parent-death signal. It belongs to no process and outlives
the one that started it; ``budgeter redis stop`` stops it. Its port is remembered and
reused on the next start, so processes that were using it reconnect to the same address.

Files of the data directory:

- ``redis.url``: ``redis://127.0.0.1:PORT/0``, present while the server runs. A url file
  is believed only when the server on that port answers with this data directory as its
  ``dir``; otherwise it is stale and replaced.
- ``redis.port``: the remembered port (kept when the server stops).
- ``redis.pid`` (redis-server's pidfile), ``redis.lock`` (the start/stop lock),
  ``redis.log``, ``appendonly.aof``, ``dump.rdb``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis as sync_redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from budgeter.store.embedded import EmbeddedRedisError, find_redis_server, free_port

URL_FILE = "redis.url"
PORT_FILE = "redis.port"
PID_FILE = "redis.pid"
LOCK_FILE = "redis.lock"
LOG_FILE = "redis.log"
_START_FAILURES = ("Could not create server TCP listening socket", "Fatal error", "FATAL")


@dataclass(frozen=True, slots=True)
class SharedServer:
    """A running shared server: where it listens, its process, its data."""

    url: str
    port: int
    pid: int
    data_dir: Path


def format_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def parse_url(text: str) -> int:
    """The port of a url file's ``redis://127.0.0.1:PORT/0``; ValueError otherwise."""
    text = text.strip()
    prefix = "redis://127.0.0.1:"
    if not (text.startswith(prefix) and text.endswith("/0")):
        raise ValueError(f"not an embedded Redis URL: {text!r}")
    port = int(text[len(prefix) : -2])
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return port


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: nobody may reap a daemon's corpse)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): kill(0) is all we know
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _client(port: int) -> sync_redis.Redis:
    return sync_redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=2,
        socket_connect_timeout=1,
        decode_responses=True,
        single_connection_client=True,
        retry=Retry(NoBackoff(), 0),
    )


def probe(port: int, data_dir: Path) -> int | None:
    """The pid of the redis-server on ``port`` when its ``dir`` is ``data_dir``, else None."""
    try:
        with _client(port) as client:
            found = client.config_get("dir").get("dir")
            pid = client.info("server").get("process_id")
    except (RedisError, OSError, ValueError):
        return None
    if found != str(data_dir) or not isinstance(pid, int):
        return None
    return pid


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class SharedRedis:
    """The shared server of one data directory: find it, start it, stop it."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        binary: str | None = None,
        lock_timeout_s: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.binary = binary
        self.lock_timeout_s = lock_timeout_s

    def _path(self, name: str) -> Path:
        return self.data_dir / name

    def running(self) -> SharedServer | None:
        """The server the url file names, when it answers as this data dir's; else None."""
        try:
            port = parse_url(self._path(URL_FILE).read_text())
        except (OSError, ValueError):
            return None
        pid = probe(port, self.data_dir)
        if pid is None:
            return None
        return SharedServer(format_url(port), port, pid, self.data_dir)

    def remembered_port(self) -> int | None:
        try:
            port = int(self._path(PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return port if 0 < port < 65536 else None

    def ensure(self, timeout_s: float = 30.0) -> tuple[SharedServer, bool]:
        """The running server, started here when there was none (then True)."""
        found = self.running()
        if found is not None:
            return found, False
        with self._locked():
            found = self.running()  # another process may have started it meanwhile
            if found is not None:
                return found, False
            return self._start(timeout_s), True

    def stop(self, timeout_s: float = 30.0) -> SharedServer | None:
        """SHUTDOWN SAVE the running server and remove the url file; the server that was
        stopped, or None when none was running."""
        with self._locked():
            found = self.running()
            if found is None:
                self._path(URL_FILE).unlink(missing_ok=True)
                return None
            with contextlib.suppress(RedisError, OSError), _client(found.port) as client:
                client.shutdown(save=True)
            deadline = time.monotonic() + timeout_s
            while pid_alive(found.pid) or probe(found.port, self.data_dir) is not None:
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server (pid {found.pid}) did not stop within {timeout_s:g} s"
                    )
                time.sleep(0.05)
            self._path(URL_FILE).unlink(missing_ok=True)
            return found

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = open(self._path(LOCK_FILE), "a")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot use the data dir {self.data_dir} (BUDGETER_DATA_DIR): "
                f"{exc.strerror or exc}"
            ) from None
        with lock:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedRedisError(
                            f"another process holds {self._path(LOCK_FILE)} "
                            f"for more than {self.lock_timeout_s:g} s"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _port_to_use(self) -> int:
        port = self.remembered_port()
        if port is not None and port_is_free(port):
            return port
        return free_port()

    def _start(self, timeout_s: float) -> SharedServer:
        """Start a detached server (the lock is held); returns once it answers."""
        self._path(URL_FILE).unlink(missing_ok=True)  # stale: nothing answers for it
        remembered = self.remembered_port()
        pid = probe(remembered, self.data_dir) if remembered else None
        if remembered and pid is not None:  # running, but its url file was removed
            _write_atomically(self._path(URL_FILE), format_url(remembered) + "\n")
            return SharedServer(format_url(remembered), remembered, pid, self.data_dir)
        self._refuse_a_live_stranger()
        port = self._port_to_use()
        log_path = self._path(LOG_FILE)
        log_start = log_path.stat().st_size if log_path.exists() else 0
        args = [
            self.binary or find_redis_server(),
            *("--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
            *("--dir", str(self.data_dir), "--dbfilename", "dump.rdb", "--save", ""),
            *("--appendonly", "yes", "--appendfilename", "appendonly.aof"),
            *("--logfile", str(log_path), "--pidfile", str(self._path(PID_FILE))),
            *("--daemonize", "yes"),
        ]
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own session: no terminal's signals reach it
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()
            raise EmbeddedRedisError(f"redis-server did not start: {err[-300:]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = probe(port, self.data_dir)
            if pid is not None:
                _write_atomically(self._path(PORT_FILE), f"{port}\n")
                _write_atomically(self._path(URL_FILE), format_url(port) + "\n")
                return SharedServer(format_url(port), port, pid, self.data_dir)
            failure = self._start_failure(log_start)
            if failure:
                raise EmbeddedRedisError(f"redis-server did not start on port {port}: {failure}")
            time.sleep(0.02)
        raise EmbeddedRedisError(
            f"redis-server did not answer on port {port} within {timeout_s:g} s (see {log_path})"
        )

    def _refuse_a_live_stranger(self) -> None:
        """A redis-server of this data dir that runs but does not answer (still loading a
        large AOF, or hung) must not get a second server on the same files."""
        try:
            pid = int(self._path(PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return
        if not pid_alive(pid):
            self._path(PID_FILE).unlink(missing_ok=True)
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b"redis-server"  # no /proc: believe the pidfile
        if b"redis-server" in cmdline:
            raise EmbeddedRedisError(
                f"redis-server pid {pid} of {self.data_dir} runs but does not answer; "
                f"wait for it, or stop it (kill {pid})"
            )
        self._path(PID_FILE).unlink(missing_ok=True)  # the pid was reused by another program

    def _start_failure(self, log_start: int) -> str | None:
        try:
            with open(self._path(LOG_FILE), "rb") as log:
                log.seek(log_start)
                text = log.read().decode(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if any(marker in line for marker in _START_FAILURES):
                return line.strip()[-300:]
        return None
