"""The round pipeline on Redis Cluster (the session's cluster: three masters with one
replica each): the script calls of one event-loop round go as at most one pipeline per
node, each call gets its own answer or error, and NOSCRIPT on one node reloads the script
there."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterCrossSlotError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.store import scripts
from budgeter.store.client import make_redis
from budgeter.store.cluster_client import as_connection_error, closed_under_us
from budgeter.store.embedded import free_port
from budgeter.store.scripts import PipelinedScript, round_pipeline

ECHO = """
-- KEYS[1]: any key; ARGV[1]: a word
-- returns KEYS[1] .. ':' .. ARGV[1], or an error reply when ARGV[1] is 'boom'
if ARGV[1] == 'boom' then return redis.error_reply('boom') end
redis.call('INCR', KEYS[1])
return KEYS[1] .. ':' .. ARGV[1]
"""


class Trips:
    """Counts, per node, the pipelines and the lone commands the cluster client sends."""

    def __init__(self) -> None:
        self.pipelines: Counter[str] = Counter()
        self.alone: Counter[str] = Counter()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[Trips]:
    counted = Trips()
    real_pipeline = ClusterNode.execute_pipeline
    real_command = ClusterNode.execute_command

    async def pipeline(node: ClusterNode, commands: list[Any]) -> bool:
        counted.pipelines[node.name] += 1
        return await real_pipeline(node, commands)

    async def command(node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        counted.alone[node.name] += 1
        return await real_command(node, *args, **kwargs)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", pipeline)
    monkeypatch.setattr(ClusterNode, "execute_command", command)
    yield counted


def keys_on_every_master(redis: RedisCluster, per_node: int) -> dict[str, list[str]]:
    """``per_node`` keys of distinct slots on each master, by node name."""
    found: dict[str, list[str]] = {node.name: [] for node in redis.get_primaries()}
    n = 0
    while any(len(keys) < per_node for keys in found.values()):
        key = f"{{t:k{n}}}:x"
        n += 1
        node = redis.get_node_from_key(key)
        assert node is not None
        if len(found[node.name]) < per_node:
            found[node.name].append(key)
    return found


async def test_a_round_goes_as_one_pipeline_per_node_with_each_answer_its_own(
    cluster_redis: RedisCluster, trips: Trips
) -> None:
    script = PipelinedScript(cluster_redis, cluster_redis.register_script(ECHO))
    await cluster_redis.script_load(ECHO)  # on every master: no NOSCRIPT below
    by_node = keys_on_every_master(cluster_redis, 10)
    keys = [key for node_keys in by_node.values() for key in node_keys]
    trips.pipelines.clear()
    trips.alone.clear()
    words = ["boom" if n == 7 else f"w{n}" for n in range(len(keys))]
    answers = await asyncio.gather(
        *(script(keys=[key], args=[word]) for key, word in zip(keys, words, strict=True)),
        return_exceptions=True,
    )
    for n, (key, answer) in enumerate(zip(keys, answers, strict=True)):
        if n == 7:  # the script's error is that call's alone
            assert isinstance(answer, ResponseError) and "boom" in str(answer)
        else:
            assert answer == f"{key}:w{n}"
    assert trips.pipelines == Counter({name: 1 for name in by_node})  # one each, 30 calls
    assert not trips.alone
    for n, key in enumerate(keys):  # each call ran once, on the node of its key
        assert await cluster_redis.get(key) == (None if n == 7 else "1")


async def loaded(redis: RedisCluster, node: ClusterNode, sha: str) -> bool:
    found = await redis.execute_command("SCRIPT EXISTS", sha, target_nodes=node)
    return bool(found[0])


async def test_noscript_on_one_node_reloads_there_and_every_call_succeeds(
    cluster_redis: RedisCluster,
) -> None:
    script = PipelinedScript(cluster_redis, cluster_redis.register_script(ECHO))
    await cluster_redis.script_load(ECHO)
    by_node = keys_on_every_master(cluster_redis, 3)
    flushed = next(iter(by_node))
    node = cluster_redis.get_node(node_name=flushed)
    assert node is not None
    await cluster_redis.execute_command("SCRIPT FLUSH", target_nodes=node)  # as on a restart
    assert not await loaded(cluster_redis, node, script.sha)
    keys = [key for node_keys in by_node.values() for key in node_keys]
    answers = await asyncio.gather(*(script(keys=[key], args=["a"]) for key in keys))
    assert answers == [f"{key}:a" for key in keys]
    assert await loaded(cluster_redis, node, script.sha)


async def test_a_call_whose_keys_span_slots_fails_alone(cluster_redis: RedisCluster) -> None:
    script = PipelinedScript(cluster_redis, cluster_redis.register_script("return #KEYS"))
    await cluster_redis.script_load("return #KEYS")
    good, bad = await asyncio.gather(
        script(keys=["{t:a}:1", "{t:a}:2"]),
        script(keys=["{t:a}:1", "{t:b}:1"]),
        return_exceptions=True,
    )
    assert good == 2
    assert isinstance(bad, ClusterCrossSlotError)


async def test_reserves_settles_and_cache_reads_of_many_tenants_share_the_nodes_pipelines(
    cluster_redis: RedisCluster, trips: Trips
) -> None:
    """Reserves for tenants on every master (BatchedScript: one script call per tenant)
    and count-cache GETs in the same round: one pipeline per node, every answer its own;
    the settles the same way."""
    from budgeter.admission.admission import Admission, Usage
    from budgeter.domain.policy import TenantPolicy
    from budgeter.tenants.store import TenantStore

    tenants = [f"tn{n}" for n in range(12)]
    for tenant in tenants:
        await TenantStore(cluster_redis).put(tenant, TenantPolicy(budgets={"day": 10**9}))
    admission = Admission(cluster_redis)
    rounds = round_pipeline(cluster_redis)
    await admission.reserve("tn0", "warm", 1, 1, model="m", now_ms=10**12)  # loads the script
    await admission.settle("tn0", "warm", Usage(1, 1), now_ms=10**12)
    cache_keys = [f"budgeter:count:{n}" for n in range(6)]
    trips.pipelines.clear()
    trips.alone.clear()
    asks = [(t, f"{t}-{i}") for t in tenants for i in range(5)]
    decisions, cached = await asyncio.gather(
        asyncio.gather(
            *(admission.reserve(t, rid, 100, 10, model="m", now_ms=10**12) for t, rid in asks)
        ),
        asyncio.gather(*(rounds.command("GET", key) for key in cache_keys)),
    )
    assert [d.kind for d in decisions] == ["ADMIT"] * len(asks) and cached == [None] * 6
    nodes = {node.name for node in cluster_redis.get_primaries()}
    assert set(trips.pipelines) <= nodes and max(trips.pipelines.values()) == 1
    assert not trips.alone
    trips.pipelines.clear()
    results = await asyncio.gather(
        *(admission.settle(t, rid, Usage(100, 5), now_ms=10**12) for t, rid in asks)
    )
    assert [r.settled for r in results] == [1] * len(asks)
    assert max(trips.pipelines.values()) == 1 and not trips.alone
    for tenant in tenants:
        budget = await cluster_redis.hgetall(f"budgeter:{{t:{tenant}}}:budget")
        assert budget["day:reserved"] == "0"
        assert budget["day:used"] == str(5 * 105 + (2 if tenant == "tn0" else 0))


async def test_a_stale_slot_table_is_followed_call_by_call(
    cluster_redis: RedisCluster, trips: Trips
) -> None:
    """Keys whose slot this client thinks is on another node: their calls go in that
    node's pipeline, are answered MOVED, and go again alone to the right node; the other
    calls of the round are answered at once."""
    script = PipelinedScript(cluster_redis, cluster_redis.register_script(ECHO))
    await cluster_redis.script_load(ECHO)
    by_node = keys_on_every_master(cluster_redis, 2)
    names = list(by_node)
    moved_key = by_node[names[0]][0]
    wrong = cluster_redis.get_node(node_name=names[1])
    assert wrong is not None
    slot = cluster_redis.keyslot(moved_key)
    right = cluster_redis.nodes_manager.slots_cache[slot]
    cluster_redis.nodes_manager.slots_cache[slot] = [wrong]
    try:
        keys = [key for node_keys in by_node.values() for key in node_keys]
        trips.pipelines.clear()
        trips.alone.clear()
        answers = await asyncio.gather(*(script(keys=[key], args=["m"]) for key in keys))
    finally:
        cluster_redis.nodes_manager.slots_cache[slot] = right
    assert answers == [f"{key}:m" for key in keys]
    assert trips.pipelines == Counter({name: 1 for name in by_node})  # the moved call in 1's
    assert trips.alone[names[0]] >= 1  # then alone, to its real node
    for key in keys:
        assert await cluster_redis.get(key) == "1"  # each ran once


async def test_a_node_that_cannot_be_reached_holds_up_only_its_own_calls(
    cluster_redis: RedisCluster, trips: Trips
) -> None:
    """A slot this client thinks is on a node that does not answer: that node's pipeline
    fails to connect, its call goes again alone (the client re-reads the topology and
    finds the real master); the other nodes' calls are answered from their pipelines."""
    script = PipelinedScript(cluster_redis, cluster_redis.register_script(ECHO))
    await cluster_redis.script_load(ECHO)
    by_node = keys_on_every_master(cluster_redis, 2)
    lost_key = next(iter(by_node.values()))[0]
    slot = cluster_redis.keyslot(lost_key)
    dead = ClusterNode("127.0.0.1", free_port(), socket_connect_timeout=1)
    cluster_redis.nodes_manager.slots_cache[slot] = [dead]
    keys = [key for node_keys in by_node.values() for key in node_keys]
    trips.pipelines.clear()
    try:
        answers = await asyncio.gather(*(script(keys=[key], args=["d"]) for key in keys))
    finally:
        await dead.disconnect()
    assert answers == [f"{key}:d" for key in keys]
    assert trips.pipelines[dead.name] == 1
    assert all(trips.pipelines[name] == 1 for name in by_node)
    assert cluster_redis.nodes_manager.slots_cache[slot][0].name != dead.name  # re-read


async def _as_raised_by_budgeter(error: BaseException) -> BaseException:
    """What :func:`as_connection_error` makes of a call that fails with ``error``."""

    async def fails() -> None:
        raise error

    with pytest.raises(RedisConnectionError) as raised:
        await as_connection_error(fails())
    return raised.value


async def test_a_connection_closed_under_a_call_is_a_connection_error(
    cluster_redis: RedisCluster,
) -> None:
    """redis-py's cluster client disconnects a node's connections when it re-reads the
    topology, also one another call is about to write on. That is a dropped connection,
    retried as one (a job whose settle met it was given back and served again, before).
    Before redis-py 8.2 the call met a stream set to None (AttributeError from inside
    redis-py), which budgeter classifies; since 8.2 (constraints.txt) the connection says
    so itself, a ConnectionError passed on as it is."""
    await cluster_redis.set("k", "v")
    error = await _write_on_a_closed_connection(cluster_redis)
    if isinstance(error, RedisConnectionError):  # redis-py >= 8.2
        assert "closed" in str(error)
        assert not closed_under_us(error)
        assert await _as_raised_by_budgeter(error) is error
    else:
        assert isinstance(error, AttributeError)  # the stream set to None
        assert closed_under_us(error)
        assert "connection closed while in use" in str(await _as_raised_by_budgeter(error))
    assert not closed_under_us(AttributeError("ours"))  # a bug of budgeter's stays a bug
    assert not closed_under_us(RuntimeError("closed, but not in redis-py"))


def test_under_uvloop_a_closed_transport_is_a_connection_error_too(
    redis_cluster_url: str,
) -> None:
    """In the same race uvloop's closed transport made the write raise RuntimeError ("the
    handler is closed"), classified by budgeter; since redis-py 8.2 a ConnectionError."""
    uvloop = pytest.importorskip("uvloop")

    async def closed() -> BaseException:
        client: Any = make_redis(redis_cluster_url)
        try:
            await client.set("k", "v")
            return await _write_on_a_closed_connection(client, keep_stream=True)
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        error = runner.run(closed())
    if isinstance(error, RedisConnectionError):  # redis-py >= 8.2
        assert "closed" in str(error)
    else:
        assert isinstance(error, RuntimeError)
        assert closed_under_us(error)


async def _write_on_a_closed_connection(
    redis: RedisCluster, *, keep_stream: bool = False
) -> BaseException:
    """What a write meets on a connection that another coroutine closed under it (with
    ``keep_stream``: the transport closed, the stream object still there)."""
    node = redis.get_node_from_key("k")
    connection = node.acquire_connection()
    try:
        await connection.connect()
        if keep_stream:
            writer = connection._writer
            assert writer is not None
            writer.close()
            await asyncio.sleep(0)
        else:
            await connection.disconnect()  # as the topology refresh does, under the call
        try:
            await connection._send_packed_command([b"PING\r\n"])
        except (AttributeError, RuntimeError, RedisConnectionError) as exc:
            return exc
        raise AssertionError("the write went through")
    finally:
        await connection.disconnect()
        node.release(connection)


def _held_node(monkeypatch: pytest.MonkeyPatch, name: str, release: asyncio.Event) -> None:
    """The pipelines sent to node ``name`` wait for ``release`` before they go."""
    real_pipeline = ClusterNode.execute_pipeline

    async def pipeline(node: ClusterNode, commands: list[Any]) -> bool:
        if node.name == name:
            await release.wait()
        return await real_pipeline(node, commands)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", pipeline)


async def test_a_rounds_replies_are_handed_out_together(
    cluster_redis: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on one Redis, the callers of a round wake together, so their next calls batch
    in one round again: no caller sees its answer while another node's is still out (the
    grace is made long here, so that the order is the test's, not the machine's)."""
    monkeypatch.setattr(scripts, "ROUND_GRACE_S", 30.0)
    by_node = keys_on_every_master(cluster_redis, 2)
    slow = next(iter(by_node))
    release = asyncio.Event()
    _held_node(monkeypatch, slow, release)
    pipe = round_pipeline(cluster_redis)
    futures = [pipe.command("INCR", key) for keys in by_node.values() for key in keys]
    woken: list[bool] = []

    async def caller(future: asyncio.Future[Any]) -> None:
        await future
        woken.append(all(f.done() for f in futures))

    callers = [asyncio.ensure_future(caller(f)) for f in futures]
    for _ in range(20):  # the other nodes answer; their callers still wait
        await asyncio.sleep(0.01)
    assert woken == []
    release.set()
    await asyncio.wait_for(asyncio.gather(*callers), 30)
    assert woken == [True] * len(futures)


async def test_a_node_slower_than_the_grace_holds_up_only_its_own_calls(
    cluster_redis: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that does not answer (failing over, say) keeps the round's other answers
    no longer than ROUND_GRACE_S: they are handed out while its own calls still wait."""
    by_node = keys_on_every_master(cluster_redis, 2)
    slow = next(iter(by_node))
    release = asyncio.Event()
    _held_node(monkeypatch, slow, release)
    pipe = round_pipeline(cluster_redis)
    held = [pipe.command("INCR", key) for key in by_node[slow]]
    others = [pipe.command("INCR", k) for n, keys in by_node.items() if n != slow for k in keys]
    assert await asyncio.wait_for(asyncio.gather(*others), 30) == [1] * len(others)
    assert not any(f.done() for f in held)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*held), 30) == [1] * len(held)
