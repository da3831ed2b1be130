"""The embedded Redis Cluster with replicas: the topology it reports, and a master killed
(SIGKILL) whose replica takes over its slots."""

from __future__ import annotations

from pathlib import Path

import redis as sync_redis

from budgeter.store.embedded import EmbeddedRedisCluster


def test_the_session_cluster_has_one_replica_in_sync_per_master(
    embedded_cluster: EmbeddedRedisCluster,
) -> None:
    nodes = embedded_cluster.nodes()
    masters = {node.id: node for node in nodes if node.role == "master"}
    replicas = [node for node in nodes if node.role == "replica"]
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(replica.master_id or "" for replica in replicas) == sorted(masters)
    covered = sum(high - low + 1 for node in masters.values() for low, high in node.slots)
    assert covered == 16384
    assert embedded_cluster.ready()
    for replica in replicas:
        info = embedded_cluster.cli(replica.port, "info", "replication")
        assert "master_link_status:up" in info


def test_a_killed_master_is_replaced_by_its_replica_with_the_data(tmp_path: Path) -> None:
    cluster = EmbeddedRedisCluster(tmp_path / "cluster", replicas=1)
    cluster.start()
    try:
        key = "{t:failover}:k"
        master = cluster.master_of(key)
        assert master.port is not None
        client = sync_redis.Redis(port=master.port, decode_responses=True)
        client.set(key, "kept")
        assert client.wait(1, 5000) == 1  # the replica has it
        client.close()
        cluster.kill(master)
        promoted = cluster.wait_promoted(key, master)
        assert promoted is not master and promoted.port is not None
        client = sync_redis.Redis(port=promoted.port, decode_responses=True)
        assert client.get(key) == "kept"
        client.close()
        assert cluster.url.endswith(f":{cluster.running()[0].port}/0")
    finally:
        cluster.stop()
