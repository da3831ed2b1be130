"""Invariant 2: every script call touches keys of one hash slot (Redis Cluster ready)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue
from budgeter.store.scripts import BatchedScript
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for


class SlotRecorder:
    """Wraps each registered script and records the slots of the KEYS of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, set[int]]] = []

    def wrap(self, name: str, script: Any) -> Any:
        async def call(keys: list[str], args: list[Any]) -> Any:
            self.calls.append((name, {key_slot(k.encode()) for k in keys}))
            return await script(keys=keys, args=args)

        return call


@pytest.mark.parametrize("tenant", ["acme", "a-much_longer-tenant-name-0123456789"])
async def test_every_script_call_uses_one_hash_slot(redis: Redis, tenant: str) -> None:
    recorder = SlotRecorder()
    await TenantStore(redis).put(tenant, TenantPolicy(budgets={"day": 10_000}, rate={"rpm": 5}))
    admission = Admission(redis)
    store = BatchStore(redis)
    queue: JobQueue = store.queue
    for owner in (admission, queue):
        for attr, value in list(vars(owner).items()):
            if isinstance(value, BatchedScript):  # many requests per call: wrap that call
                value.script = recorder.wrap(attr, value.script)
            elif attr.startswith("_") and hasattr(value, "sha"):
                setattr(owner, attr, recorder.wrap(attr, value))
    batch_id = await store.create(tenant, requests_for("x", 3))
    pick = await queue.pick(lease_ms=1000)
    assert pick.job is not None
    await queue.heartbeat(pick.job, lease_ms=1000, reservation_id="r", hold_ms=1000)
    await admission.reserve(tenant, "r", 10, 10)
    await admission.mark_sent(tenant, "r")
    await admission.settle(tenant, "r", Usage(10, 5))
    await admission.reap(tenant)
    await queue.defer(pick.job, 0)
    await queue.reclaim(tenant, max_attempts=3)
    job = (await queue.pick(lease_ms=1000)).job
    assert job is not None
    await queue.ack(job, "succeeded", {"type": "succeeded"})
    assert batch_id
    names = {name for name, _ in recorder.calls}
    assert {"_reserve", "_settle", "_dequeue", "_ack", "_pick", "_park"} <= names
    for name, slots in recorder.calls:
        assert len(slots) == 1, f"{name} spans slots {slots}"
