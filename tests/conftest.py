"""Test fixtures: a real redis-server on a free loopback port, started by the suite."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from budgeter.embedded_redis import EmbeddedRedis, find_redis_server, free_cluster_port
from budgeter.redis_client import make_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real redis-server for the whole session (no persistence: tests flush it)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = make_redis(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real three-master Redis Cluster on loopback ports (no replicas, no persistence)."""
    servers = []
    for index in range(3):
        server = EmbeddedRedis(
            tmp_path_factory.mktemp(f"cluster{index}"),
            port=free_cluster_port(),
            appendonly=False,
            extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
        )
        server.start()
        servers.append(server)
    cli = str(Path(find_redis_server()).with_name("redis-cli"))
    nodes = [f"127.0.0.1:{server.port}" for server in servers]
    subprocess.run(
        [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = subprocess.run(
            [cli, "-p", str(servers[0].port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        if "cluster_state:ok" in info:
            break
        time.sleep(0.1)
    yield f"redis+cluster://{nodes[0]}/0"
    for server in servers:
        server.stop()


@pytest.fixture
async def cluster_redis(redis_cluster_url: str) -> AsyncIterator[Any]:
    client = make_redis(redis_cluster_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def artifacts_dir() -> Path:
    path = Path(os.environ.get("BUDGETER_TEST_ARTIFACTS", "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
