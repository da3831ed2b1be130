"""A master with replicas on loopback for tests (real redis-servers from
:func:`find_redis_server`, no Sentinel): ``pause(i)`` SIGSTOPs replica ``i`` (it stays
connected and stops acknowledging, as a replica that hangs or is cut off does) and
``resume(i)`` lets it go on."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import redis as sync_redis

from budgeter.store.embedded import EmbeddedRedis, EmbeddedRedisError


class Replicated:
    def __init__(self, root: Path, *, replicas: int = 2) -> None:
        self.root = root
        self.count = replicas
        self.master = EmbeddedRedis(root / "master", appendonly=False)
        self.replicas: list[EmbeddedRedis] = []
        self._paused: set[int] = set()

    @property
    def url(self) -> str:
        return self.master.url

    def start(self, timeout_s: float = 30.0) -> str:
        self.master.start()
        for index in range(self.count):
            replica = EmbeddedRedis(
                self.root / f"replica{index}",
                appendonly=False,
                extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
            )
            replica.start()
            self.replicas.append(replica)
        self.wait_in_sync(timeout_s)
        return self.url

    def wait_in_sync(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) until the master counts every replica as connected and in sync."""
        deadline = time.monotonic() + timeout_s
        assert self.master.port is not None
        with sync_redis.Redis(port=self.master.port, socket_timeout=5) as master:
            while time.monotonic() < deadline:
                info = master.info("replication")
                online = [
                    value
                    for name, value in info.items()
                    if name.startswith("slave") and isinstance(value, dict)
                ]
                if len(online) == self.count and all(s["state"] == "online" for s in online):
                    return
                time.sleep(0.05)
        raise EmbeddedRedisError(f"replicas not in sync within {timeout_s} s")

    def replica_client(self, index: int) -> sync_redis.Redis:
        port = self.replicas[index].port
        assert port is not None
        return sync_redis.Redis(port=port, socket_timeout=5, decode_responses=True)

    def _signal(self, index: int, sig: signal.Signals) -> None:
        process = self.replicas[index].process
        assert process is not None
        process.send_signal(sig)

    def pause(self, index: int) -> None:
        self._signal(index, signal.SIGSTOP)
        self._paused.add(index)

    def resume(self, index: int) -> None:
        self._signal(index, signal.SIGCONT)
        self._paused.discard(index)

    def stop(self) -> None:
        for index in list(self._paused):
            self.resume(index)
        for server in (*self.replicas, self.master):
            server.stop()
