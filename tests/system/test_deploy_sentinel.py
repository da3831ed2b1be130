"""deploy/compose.sentinel.yaml, the Sentinel variant of the compose file, agrees with
itself, with deploy/docker-compose.yml and with the code. Parsed, not run (no Docker
engine here): three Sentinels watch the compose `redis` service under the master name the
budgeter URL asks for, with a quorum they can reach; two replicas of it, each announcing
its own service name and keeping AOF; the api and the worker reach the master through
those Sentinels, with a WAIT that the set can still meet after losing one node."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from budgeter.settings import load_settings
from budgeter.store.urls import SentinelURL

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "docker-compose.yml"
SENTINEL = DEPLOY / "compose.sentinel.yaml"
GLOBAL_OPTIONS = ("resolve-hostnames", "announce-hostnames")


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _merged() -> dict[str, dict[str, Any]]:
    """The services as compose merges the override over the base (mappings merged, the
    rest replaced)."""
    services: dict[str, dict[str, Any]] = {
        name: dict(spec) for name, spec in _load(BASE)["services"].items()
    }
    for name, spec in _load(SENTINEL)["services"].items():
        merged = services.setdefault(name, {})
        for key, value in spec.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return services


def _sentinel_config(service: dict[str, Any]) -> list[str]:
    """The lines the Sentinel's command writes into its config file."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"]
    words = shlex.split(command[2])
    start = words.index("printf") + 2
    return words[start : words.index(">")]


def test_three_sentinels_watch_the_master_the_url_names() -> None:
    services = _merged()
    sentinels = {name: s for name, s in services.items() if name.startswith("sentinel-")}
    assert len(sentinels) == 3
    env = services["api"]["environment"]
    url = SentinelURL.parse(env["BUDGETER_REDIS_URL"])
    assert {host for host, _ in url.sentinels} == set(sentinels)
    for name, service in sentinels.items():
        lines = _sentinel_config(service)
        port = int(next(line.split()[1] for line in lines if line.startswith("port ")))
        assert (name, port) in url.sentinels
        assert str(port) in service["expose"]
        monitor = next(line.split() for line in lines if line.startswith("sentinel monitor"))
        master, host, master_port, quorum = monitor[2:]
        assert master == url.master
        assert (host, master_port) == ("redis", "6379")
        assert 2 <= int(quorum) <= len(sentinels)  # a majority, reachable with one lost
        assert "sentinel resolve-hostnames yes" in lines
        assert "sentinel announce-hostnames yes" in lines
        for words in (line.split() for line in lines):
            if words[0] == "sentinel" and words[1] not in GLOBAL_OPTIONS:
                assert words[2] == url.master, words  # every per-master line: that master
        assert service["volumes"][0].split(":")[1] == "/data"  # the rewritten config stays


def test_two_replicas_with_aof_each_announcing_its_own_name() -> None:
    services = _merged()
    nodes = {name: s for name, s in services.items() if re.fullmatch(r"redis(-replica-\d)?", name)}
    assert len(nodes) == 3
    for name, service in nodes.items():
        command = " ".join(service["command"])
        assert "--appendonly yes" in command and "--appendfsync everysec" in command
        assert f"--replica-announce-ip {name}" in command
        if name != "redis":
            assert "--replicaof redis 6379" in command
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    volumes = _load(SENTINEL)["volumes"]
    for name, service in services.items():
        if name.startswith(("redis-replica-", "sentinel-")):
            assert service["volumes"][0].split(":")[0] in volumes


def test_budgeter_reaches_redis_through_the_sentinels_with_a_wait_it_can_keep() -> None:
    services = _merged()
    replicas = sum(1 for name in services if name.startswith("redis-replica-"))
    for name in ("api", "worker"):
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        assert env["BUDGETER_REDIS_URL"].startswith("redis+sentinel://")
        settings = load_settings(
            redis_url=env["BUDGETER_REDIS_URL"],
            redis_wait_replicas=env["BUDGETER_REDIS_WAIT_REPLICAS"],
            redis_wait_timeout_ms=env["BUDGETER_REDIS_WAIT_TIMEOUT_MS"],
        )
        # N + 1 replicas for WAIT N: one node lost, the WAIT is still met
        assert 1 <= settings.redis_wait_replicas <= replicas - 1
        for dependency in ("redis", "sentinel-1", "sentinel-2", "sentinel-3"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"
        # the rest of the base service (secrets, upstream) is kept
        assert "BUDGETER_UPSTREAM_API_KEY" in env
