"""queue/batch_meta.py: the bmeta value '<enqueued ms> <deadline ms> [priority]', as
submit writes it and the queue scripts read it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from budgeter.domain.policy import PRIORITIES, TenantPolicy
from budgeter.queue.batch_meta import BatchMeta, format_batch_meta, parse_batch_meta
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.tenants.store import TenantStore

metas = st.builds(
    BatchMeta,
    st.integers(0, 2**53),
    st.integers(0, 2**53),
    st.sampled_from(PRIORITIES),
)


@given(metas)
def test_parse_inverts_format(meta: BatchMeta) -> None:
    assert parse_batch_meta(format_batch_meta(meta)) == meta


@given(metas)
def test_format_inverts_parse_of_what_submit_writes(meta: BatchMeta) -> None:
    text = format_batch_meta(meta)
    assert format_batch_meta(parse_batch_meta(text)) == text
    assert text.count(" ") == (1 if meta.priority == "normal" else 2)


@pytest.mark.parametrize(
    ("text", "meta"),
    [
        ("1000 2000", BatchMeta(1000, 2000, "normal")),
        ("1000 2000 high", BatchMeta(1000, 2000, "high")),
        ("1000 2000 normal", BatchMeta(1000, 2000, "normal")),
        ("1000", BatchMeta(1000, 0, "normal")),  # a foreign producer's: no deadline
        ("x y", BatchMeta(None, 0, "normal")),
        ("", BatchMeta(None, 0, "normal")),
        (b"5 6 low", BatchMeta(5, 6, "low")),
    ],
)
def test_lenient_parse(text: str | bytes, meta: BatchMeta) -> None:
    assert parse_batch_meta(text) == meta


async def test_submit_writes_it_and_dequeue_reads_it_back(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("acme", "b1", [NewJob("c1", {"a": 1})], ttl_ms=5000, priority="high")
    raw = await redis.hget(queue.keys("acme").bmeta, "b1")
    assert raw is not None
    meta = parse_batch_meta(raw)
    assert meta.enqueued_ms is not None and meta.deadline_ms == meta.enqueued_ms + 5000
    assert raw == format_batch_meta(meta) == f"{meta.enqueued_ms} {meta.deadline_ms} high"
    pick = await queue.pick(lease_ms=30_000)
    assert pick.job is not None
    assert (pick.job.enqueued_ms, pick.job.deadline_ms, pick.job.priority) == (
        meta.enqueued_ms,
        meta.deadline_ms,
        "high",
    )
    # requeue.lua reads the priority back from the same value: the job returns to 'high'
    assert await queue.retry_later(pick.job) == "requeued"
    assert await redis.lrange(queue.keys("acme").queue_high, 0, -1) == ["b1:c1"]
