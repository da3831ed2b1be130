"""Test fixtures: a real redis-server on a free loopback port, started by the suite."""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis, EmbeddedRedisCluster
from budgeter.store.shared_redis import SharedRedis
from budgeter.store.types import RedisClient

# every Hypothesis test without settings of its own draws the same examples on every run
# (the admission property test has its own profiles, `deep` unseeded: make test-deep)
settings.register_profile("budgeter", derandomize=True, database=None)
settings.load_profile("budgeter")

# genai-prices' data (tens of thousands of objects) is loaded once and never freed: moved out
# of the collector's reach so the gc.collect() after each test does not walk it every time
import genai_prices.data  # noqa: E402, F401 (imported for its side effect: the loaded table)

gc.freeze()

_MUTMUT_STAGES = {"", "stats", "fail", "mutant_generation"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``make mutate`` (mutmut sets ``MUTANT_UNDER_TEST`` to the mutant's name and
    runs its tests with ``-x``), the tests of a mutant run fastest first, by the durations
    of mutmut's stats run: a mutant dies at its first failing test, so the cheap tests get
    the first try (issue 21: the slow worker tests made the whole run hours long)."""
    if os.environ.get("MUTANT_UNDER_TEST", "") in _MUTMUT_STAGES:
        return
    stats = Path("mutmut-stats.json")  # mutmut runs the tests in its mutants/ directory
    if not stats.is_file():
        return
    durations: dict[str, float] = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.fixture(scope="session", autouse=True)
def _suite_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``BUDGETER_DATA_DIR`` for the whole suite (the settings read in tests and every
    process they start): a temporary directory, never the user's ~/.local/share/budgeter.
    A shared embedded Redis some test left running there is stopped at the end."""
    data_dir = tmp_path_factory.mktemp("budgeter-data")
    previous = os.environ.get("BUDGETER_DATA_DIR")
    os.environ["BUDGETER_DATA_DIR"] = str(data_dir)
    try:
        yield data_dir
    finally:
        SharedRedis(data_dir).stop()
        if previous is None:
            os.environ.pop("BUDGETER_DATA_DIR", None)
        else:
            os.environ["BUDGETER_DATA_DIR"] = previous


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A socket or client a test leaked is collected here, so its ResourceWarning (an error
    under ``filterwarnings = ["error"]``) fails the test that leaked it, not a later one."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """A test that runs the CLI in-process gets its ``setup_logging``, whose handler
    writes to the test's captured stderr; once that is closed, a later test's log line
    would print a logging error. The root logger's handlers and level are put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = make_redis(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_url(embedded_cluster: EmbeddedRedisCluster) -> Iterator[str]:
    """A real Redis Cluster on loopback ports: three masters with one replica each, every
    replica in sync before the first test (no persistence)."""
    yield embedded_cluster.url


@pytest.fixture(scope="session")
def embedded_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    """The session's cluster itself (its servers, topology, and a way to kill a master)."""
    cluster = EmbeddedRedisCluster(tmp_path_factory.mktemp("cluster"), replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


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
