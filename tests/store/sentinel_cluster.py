"""A real Sentinel set on loopback for tests: a master, one replica (or ``replicas``) and
three Sentinels (``redis-server --sentinel`` with generated config files; quorum 2,
``down-after-milliseconds 1000`` (or ``down_after_ms``), ``failover-timeout 3000``), all from
:func:`find_redis_server`, on free ports, stopped by :meth:`SentinelSet.stop`."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis as sync_redis

from budgeter.store.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    die_with_parent,
    find_redis_server,
    free_port,
)
from budgeter.store.urls import SentinelURL

MASTER_NAME = "budgeter"


def _wait(condition_name: str, check: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``check()`` (bounded) until it is true; connection errors count as false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (sync_redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise EmbeddedRedisError(f"sentinel set: {condition_name} not reached in {timeout_s} s")


class SentinelSet:
    """``start()`` returns the ``redis+sentinel://`` URL; ``kill_master()`` SIGKILLs it."""

    def __init__(
        self,
        root: Path,
        *,
        sentinels: int = 3,
        replicas: int = 1,
        server_args: list[str] | None = None,
        username: str | None = None,
        password: str | None = None,
        down_after_ms: int = 1000,
    ) -> None:
        self.root = root
        self.down_after_ms = down_after_ms  # how long a master is silent before it is down
        self.count = sentinels
        self.server_args = list(server_args or [])
        self.username = username  # the master's login, for the URL and the Sentinels
        self.password = password
        self.master: EmbeddedRedis | None = None
        self.replica: EmbeddedRedis | None = None  # the first of ``replicas``
        self.replicas: list[EmbeddedRedis] = []
        self.replica_count = replicas
        self.sentinel_ports: list[int] = []
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return SentinelURL(
            sentinels=tuple(("127.0.0.1", port) for port in self.sentinel_ports),
            master=MASTER_NAME,
            db=0,
            username=self.username,
            password=self.password,
        ).format()

    def _client(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(
            port=port, username=self.username, password=self.password, socket_timeout=5
        )

    def _sentinel(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, socket_timeout=5, decode_responses=True)

    def start(self, timeout_s: float = 60.0) -> str:
        auth = ["--masterauth", self.password] if self.password else []
        if self.username:
            auth += ["--masteruser", self.username]
        self.master = EmbeddedRedis(
            self.root / "master", appendonly=False, extra_args=[*self.server_args, *auth]
        )
        self.master.start()
        for index in range(self.replica_count):
            replica = EmbeddedRedis(
                self.root / ("replica" if index == 0 else f"replica{index}"),
                appendonly=False,
                extra_args=[
                    *self.server_args,
                    *auth,
                    "--replicaof",
                    "127.0.0.1",
                    str(self.master.port),
                ],
            )
            replica.start()
            self.replicas.append(replica)
        self.replica = self.replicas[0]
        _wait("replica in sync", self._in_sync, timeout_s)
        for index in range(self.count):
            self._start_sentinel(index)
        _wait("sentinels see each other", self._sentinels_ready, timeout_s)
        return self.url

    def _in_sync(self) -> bool:
        for replica in self.replicas:
            assert replica.port is not None
            with self._client(replica.port) as client:
                if client.info("replication").get("master_link_status") != "up":
                    return False
        return True

    def _start_sentinel(self, index: int) -> None:
        assert self.master is not None
        directory = self.root / f"sentinel{index}"
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {directory.resolve()}",
            f"logfile {(directory / 'sentinel.log').resolve()}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} 3000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {self.password}")
        if self.username:
            lines.append(f"sentinel auth-user {MASTER_NAME} {self.username}")
        config = directory / "sentinel.conf"  # Sentinel rewrites it: one file each
        config.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen(
            [find_redis_server(), str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self._sentinels.append(process)
        self.sentinel_ports.append(port)

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with self._sentinel(port) as sentinel:
                state = sentinel.sentinel_master(MASTER_NAME)
                if (
                    state["num-other-sentinels"] < self.count - 1
                    or state["num-slaves"] < self.replica_count
                ):
                    return False
        return True

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                with self._sentinel(port) as sentinel:
                    _, master = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                    return int(master)
            except sync_redis.RedisError:
                continue
        raise EmbeddedRedisError("no Sentinel answers")

    def kill_master(self) -> int:
        """SIGKILL the master; returns its port."""
        assert self.master is not None and self.master.process is not None
        port = self.master.port
        assert port is not None
        process, self.master.process = self.master.process, None
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        if process.stderr:
            process.stderr.close()
        return port

    def wait_failover(self, old_port: int, timeout_s: float = 60.0) -> int:
        """Wait (bounded) until every Sentinel names a new master that answers as one;
        returns its port."""

        def promoted() -> bool:
            ports = set()
            for port in self.sentinel_ports:
                with self._sentinel(port) as sentinel:
                    _, master = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                    ports.add(int(master))
            if len(ports) != 1 or old_port in ports:
                return False
            with self._client(ports.pop()) as client:
                return bool(client.info("replication").get("role") == "master")

        _wait("failover", promoted, timeout_s)
        return self.master_port()

    def stop(self) -> None:
        for process in self._sentinels:
            if process.poll() is None:
                process.terminate()
        for process in self._sentinels:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._sentinels.clear()
        for server in (*self.replicas, self.master):
            if server is not None:
                server.stop()
