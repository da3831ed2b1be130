"""Per-tenant FIFO queues and the fair scheduler over them.

Submission is one MULTI/EXEC on the tenant's keys (durable: budgeter/store/durability.py).
Tenant-side scripts (dequeue, requeue, ack, reclaim, heartbeat) touch only keys with the
tenant's hash tag; scheduler scripts (activate, pick, park) touch only ``{sched}`` keys.
A worker takes a job in two calls: ``sched_pick`` chooses the tenant, ``dequeue`` leases.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT

from budgeter.domain import jsonio, policy_fields
from budgeter.domain.job_params import format_params, parse_params
from budgeter.domain.jobs import DEFAULT_TTL_MS, TERMINAL_STATES
from budgeter.domain.policy import TENANT_ID_RE
from budgeter.notify.queue_events import ack_keys, hint
from budgeter.queue.batch_meta import BatchMeta, format_batch_meta, parse_batch_meta
from budgeter.queue.leased import LeasedJob as LeasedJob
from budgeter.queue.leased import leased_jobs
from budgeter.queue.leased import split_job_id as split_job_id
from budgeter.queue.probes import ProbeEnd, wanted_from
from budgeter.store.durability import NotReplicated, durable_pipeline
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.store.scripts import register
from budgeter.store.server_time import server_time_ms
from budgeter.store.types import RedisClient, ScriptArg

WAKE_TOKENS_MAX = 32
SUBMIT_CHUNK = 1000

log = logging.getLogger("budgeter.jobqueue")


class UnknownTenantError(LookupError):
    """Work submitted for a tenant without a policy."""


_dumps = jsonio.dumps


def job_id(batch_id: str, custom_id: str) -> str:
    return f"{batch_id}:{custom_id}"


@dataclass(frozen=True, slots=True)
class NewJob:
    custom_id: str
    params: dict[str, Any]
    validated: bool = False  # by MessageParams: stored tagged, not validated again


async def oldest_queued_age_s(redis: RedisClient, keys: TenantKeys, now_ms: int) -> float:
    """Age of the oldest job waiting at the head of the tenant's queues (0: none)."""
    async with redis.pipeline(transaction=False) as pipe:
        for queue in keys.queues:
            pipe.lindex(queue, 0)
        heads = [h for h in await pipe.execute() if h]
    if not heads:
        return 0.0
    metas = await redis.hmget(keys.bmeta, [split_job_id(h)[0] for h in heads])
    enqueued = [e for m in metas if m and (e := parse_batch_meta(m).enqueued_ms) is not None]
    return max(0.0, (now_ms - min(enqueued)) / 1000) if enqueued else 0.0


@dataclass(frozen=True, slots=True)
class Pick:
    """What a worker got from the scheduler."""

    job: LeasedJob | None
    next_parked_ms: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class Picks:
    """What a worker got from the scheduler for several free slots (maybe none)."""

    jobs: list[LeasedJob]
    next_parked_ms: int
    now_ms: int


class JobQueue:
    def __init__(self, redis: RedisClient, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self.sched = SchedKeys(prefix)
        self._dequeue = register(redis, "queue/dequeue.lua")
        self._requeue = register(redis, "queue/requeue.lua")
        self._ack = register(redis, "queue/ack.lua")
        self._reclaim = register(redis, "queue/reclaim.lua")
        self._heartbeat = register(redis, "queue/heartbeat.lua")
        self._activate = register(redis, "sched/activate.lua")
        self._pick = register(redis, "sched/pick.lua")
        self._park = register(redis, "sched/park.lua")
        self.end_probe = ProbeEnd(redis, self.sched)  # await self.end_probe(t, decided=...)
        self._deactivating: set[str] = set()  # tenants whose _deactivate is running

    def keys(self, tenant: str) -> TenantKeys:
        return TenantKeys.of(self.prefix, tenant)

    # producers ----------------------------------------------------------------------

    async def submit(
        self,
        tenant: str,
        batch_id: str,
        jobs: list[NewJob],
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        priority: str = "normal",
    ) -> int:
        """Queue a batch in one MULTI/EXEC on the tenant's slot; returns how many jobs were
        new. Idempotent per (batch, custom_id): a retried submission adds only what is
        missing. WATCH on the policy and the batch makes concurrent submits of the same
        batch (and a policy deleted meanwhile) retry instead of interleaving.

        Per job, Redis gets one ``jobs`` hash entry (id -> params JSON) and one queue
        entry; the batch's order is one packed list element per 1,000 jobs, and what the
        jobs share (enqueued time, deadline, priority) one ``bmeta`` entry per batch. A
        retried submission keeps the batch's first enqueued time, deadline and priority
        for the jobs it adds.

        No Lua here on purpose: Lua 5.1 interns every argument string, and its hash samples
        only some characters of long strings, so 100,000 job bodies that differ in a few
        characters (templated prompts) collide and make a script quadratic.
        """
        keys = self.keys(tenant)
        cids = [job.custom_id for job in jobs]
        prefix = batch_id + ":"
        ids = [prefix + cid for cid in cids]
        bodies = [format_params(job.params, validated=job.validated) for job in jobs]
        batch_key = keys.batch(batch_id)
        for _ in range(20):
            async with durable_pipeline(self.redis) as pipe:  # WAITs when configured
                try:
                    await pipe.watch(keys.policy, batch_key)
                    # (HGET, not EXISTS: redis-py's cluster pipeline mishandles EXISTS
                    # in immediate mode after WATCH)
                    if await pipe.hget(keys.policy, policy_fields.JSON) is None:
                        raise UnknownTenantError(f"tenant {tenant!r} has no policy")
                    now_ms = await server_time_ms(self.redis)
                    expires = await pipe.hget(batch_key, "expires_ms")
                    fresh = list(range(len(ids)))
                    prio = priority
                    if expires is not None:  # a retried submission: skip what is there
                        present = await self._present(pipe, keys, batch_id)
                        fresh = [i for i in fresh if cids[i] not in present]
                        meta = await pipe.hget(keys.bmeta, batch_id)
                        prio = parse_batch_meta(meta).priority if meta is not None else priority
                    deadline = int(expires) if expires is not None else now_ms + int(ttl_ms)
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                    if expires is None:
                        fields: dict[FieldT, EncodableT] = {"id": batch_id, "created_ms": now_ms}
                        fields["expires_ms"] = deadline
                        for count in ("processing", *TERMINAL_STATES):
                            fields[count] = 0
                        pipe.hset(batch_key, mapping=fields)
                        pipe.zadd(keys.batches, {batch_id: now_ms})
                        meta = format_batch_meta(BatchMeta(now_ms, deadline, prio))
                        pipe.hset(keys.bmeta, batch_id, meta)
                    queue = keys.queue_for(prio)
                    order = keys.batch_jobs(batch_id)
                    for start in range(0, len(fresh), SUBMIT_CHUNK):
                        chunk = fresh[start : start + SUBMIT_CHUNK]
                        if len(fresh) == len(ids):  # the common case: every job is new
                            end = start + SUBMIT_CHUNK
                            chunk_ids, chunk_bodies = ids[start:end], bodies[start:end]
                            chunk_cids = cids[start:end]
                        else:
                            chunk_ids = [ids[i] for i in chunk]
                            chunk_bodies = [bodies[i] for i in chunk]
                            chunk_cids = [cids[i] for i in chunk]
                        flat: list[str | bytes] = [""] * (2 * len(chunk_ids))
                        flat[::2] = chunk_ids
                        flat[1::2] = chunk_bodies
                        pipe.execute_command("HSET", keys.jobs, *flat)
                        pipe.execute_command("RPUSH", queue, *chunk_ids)
                        pipe.execute_command("RPUSH", order, _dumps(chunk_cids))
                    if fresh:
                        pipe.hincrby(batch_key, "processing", len(fresh))
                        pipe.hincrby(keys.outcomes, "submitted", len(fresh))
                        pipe.hdel(batch_key, "ended_ms")
                    await pipe.execute()
                except WatchError:
                    continue
            await self.activate(tenant, wake=min(len(fresh), WAKE_TOKENS_MAX))
            return len(fresh)
        raise RuntimeError(f"batch {batch_id!r}: too many concurrent submissions, try again")

    async def _present(
        self, pipe: Pipeline | ClusterPipeline, keys: TenantKeys, batch_id: str
    ) -> set[str]:
        """The custom ids the batch already has (from its packed order list)."""
        present: set[str] = set()
        for packed in await pipe.lrange(keys.batch_jobs(batch_id), 0, -1):
            present.update(jsonio.loads(packed))
        return present

    async def activate(self, tenant: str, *, wake: int = 0, unpark: bool = False) -> None:
        """The tenant has work: put it in the ready set and wake idle workers."""
        await self._activate(
            keys=self.sched.activate_keys,
            args=[tenant, "1" if unpark else "0"],
        )
        if wake > 0:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(self.sched.wake, *([tenant] * wake))
                pipe.ltrim(self.sched.wake, -1000, -1)
                await pipe.execute()

    # workers ------------------------------------------------------------------------

    async def pick(
        self,
        *,
        lease_ms: int,
        now_ms: int | None = None,
        served: dict[str, tuple[int, int]] | None = None,
    ) -> Pick:
        """Choose a tenant fairly and lease the job at the head of its queue. ``served``
        (tenant -> (tokens, jobs) settled since the last pick) teaches the scheduler each
        tenant's job size, so that tenants share tokens rather than job counts."""
        picks = await self.pick_many(1, lease_ms=lease_ms, now_ms=now_ms, served=served)
        return Pick(picks.jobs[0] if picks.jobs else None, picks.next_parked_ms, picks.now_ms)

    async def pick_many(
        self,
        slots: int,
        *,
        lease_ms: int,
        now_ms: int | None = None,
        served: dict[str, tuple[int, int]] | None = None,
    ) -> Picks:
        """Lease up to ``slots`` jobs: one scheduler call chooses a tenant per slot (fair
        order; a probing tenant one slot), then one call per tenant leases its jobs. Jobs
        leased before another tenant's call failed are returned (else it raises)."""
        now_arg = "" if now_ms is None else str(now_ms)
        report = [x for t, (tokens, jobs) in (served or {}).items() for x in (t, tokens, jobs)]
        next_parked = now = -1
        s = self.sched
        for _ in range(8):
            reply = await self._pick(
                keys=s.pick_keys,
                args=[now_arg, 100, int(slots), int(lease_ms), *report],
            )
            report = []
            next_parked, now = int(reply[0]), int(reply[1])
            wanted, probes = wanted_from(reply[2:])
            if not wanted:
                return Picks([], next_parked, now)
            for tenant in [t for t in wanted if not TENANT_ID_RE.fullmatch(t)]:
                del wanted[tenant]  # written by a foreign producer: drop it
                await self.redis.zrem(self.sched.ready, tenant)
            take = functools.partial(self._take, lease_ms=lease_ms, now_arg=now_arg)
            takes = [take(t, n, probe=t in probes) for t, n in wanted.items()]
            taken = await asyncio.gather(*takes, return_exceptions=True)
            jobs = [job for some in taken if isinstance(some, list) for job in some]
            failed = [exc for exc in taken if isinstance(exc, BaseException)]
            if failed and not jobs:
                raise failed[0]
            for exc in failed:
                log.warning("leasing a tenant's jobs failed: %s", exc)
            if jobs:
                return Picks(jobs, next_parked, now)
        return Picks([], next_parked, now)  # the park end still told: a wake at its time

    async def _take(
        self, tenant: str, count: int, *, lease_ms: int, now_arg: str, probe: bool = False
    ) -> list[LeasedJob]:
        keys = self.keys(tenant)
        try:
            reply = await self._dequeue(
                keys=[
                    keys.queue,
                    keys.leases,
                    keys.jobs,
                    keys.jstate,
                    keys.attempts,
                    keys.bmeta,
                    keys.canceled_batches,
                    keys.policy,
                    keys.queue_high,
                    keys.queue_low,
                ],
                args=[now_arg, int(lease_ms), int(count)],
            )
        except NotReplicated as failure:
            if failure.reply is not None:  # leased on the master only: give them back
                await self._give_back(tenant, leased_jobs(tenant, failure.reply), probe=probe)
            raise
        left = int(reply[0])
        if probe and len(reply) <= 3:  # nothing to probe with: end the hold at once
            await self.end_probe(tenant, decided=False)  # (back in ready: removed below)
        if left == 0:
            await self._deactivate(tenant)
        return leased_jobs(tenant, reply, probe=probe)

    async def _give_back(self, tenant: str, jobs: list[LeasedJob], *, probe: bool) -> None:
        """Leases the replicas did not acknowledge (WAIT fell short) go back to the head of
        their queue, their attempt refunded, before anything is done with them: a failover
        that lost them could have another worker lease them again. The give-backs go in one
        round (the round pipeline); one that fails leaves its lease to expire and the job to
        be reclaimed."""
        if not jobs:
            return
        try:
            await asyncio.gather(
                *(self.requeue(job, head=True, count_attempt=False) for job in jobs)
            )
            await (
                self.end_probe(tenant, decided=False) if probe else self.activate(tenant, wake=1)
            )
        except Exception as exc:
            log.warning("giving back %d unreplicated leases failed: %s", len(jobs), exc)

    async def _deactivate(self, tenant: str) -> None:
        # Remove first, then look again: a producer pushes before it activates, so a job
        # pushed after this LLEN finds the tenant absent and activates it itself.
        # Concurrent picks that all find the queue empty leave it to the first one: one
        # skipped can at worst leave the tenant ready with nothing queued, which the next
        # pick finds and removes; it can never leave queued jobs unready.
        if tenant in self._deactivating:
            return
        self._deactivating.add(tenant)
        try:
            await self.redis.zrem(self.sched.ready, tenant)
            if await self.queued(tenant) > 0:
                await self.activate(tenant)
        finally:
            self._deactivating.discard(tenant)

    async def queued(self, tenant: str) -> int:
        """Jobs waiting in the tenant's queues (every priority)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in self.keys(tenant).queues:
                pipe.llen(queue)
            return sum(int(n) for n in await pipe.execute())

    async def requeue(self, job: LeasedJob, *, head: bool, count_attempt: bool) -> str:
        """Give a leased job back: 'requeued', 'lost' (lease not held) or 'canceled' (its
        batch is being canceled: the caller acks it as canceled)."""
        keys = self.keys(job.tenant)
        done = await self._requeue(
            keys=[
                keys.queue,
                keys.leases,
                keys.jstate,
                keys.attempts,
                keys.canceled_batches,
                keys.bmeta,
                keys.queue_high,
                keys.queue_low,
            ],
            args=[job.id, "head" if head else "tail", "0" if count_attempt else "1", job.attempt],
        )
        return {0: "lost", 1: "requeued", 2: "canceled"}[int(done)]

    async def defer(self, job: LeasedJob, until_ms: int) -> str:
        """Return a deferred job to the head of its queue and park its tenant until then."""
        outcome = await self.requeue(job, head=True, count_attempt=False)
        if outcome == "requeued":
            await self.pace(job.tenant, until_ms)
        return outcome

    async def pace(self, tenant: str, until_ms: int) -> None:
        """Park the tenant until ``until_ms`` (sched/park.lua): after a deferral (its job
        given back first), or with no job given back when an admission left its request
        rate no room before then. It comes due probing, one lease per decision."""
        s = self.sched
        await self._park(keys=[s.ready, s.parked, s.probe, s.held], args=[tenant, until_ms])

    async def retry_later(self, job: LeasedJob) -> str:
        """A failed attempt: the job goes to the tail of its queue."""
        outcome = await self.requeue(job, head=False, count_attempt=True)
        if outcome == "requeued":  # (a probe's failed attempt ends its hold: not deferred)
            await (self.end_probe(job.tenant) if job.probe else self.activate(job.tenant, wake=1))
        return outcome

    async def ack(
        self, job: LeasedJob, outcome: str, result: dict[str, Any], *, dead: bool = False
    ) -> bool:
        return await self.finish(
            job.tenant, job.id, job.batch_id, job.custom_id, outcome, result, dead=dead
        )

    async def finish(
        self,
        tenant: str,
        jid: str,
        batch_id: str,
        custom_id: str,
        outcome: str,
        result: dict[str, Any],
        *,
        dead: bool = False,
    ) -> bool:
        """Record the terminal state of a job exactly once (False: it already had one)."""
        if outcome not in TERMINAL_STATES:
            raise ValueError(f"not a terminal state: {outcome}")
        keys = self.keys(tenant)
        line = jsonio.dumps({"custom_id": custom_id, "result": result})
        args: list[ScriptArg] = [jid, outcome, line, "", "1" if dead else "0"]
        recorded, events = await self._ack(keys=ack_keys(keys, batch_id), args=args)
        await hint(self.redis, self.prefix, tenant, int(events))  # job.dead_lettered, batch.ended
        return bool(int(recorded))

    async def heartbeat(
        self,
        job: LeasedJob,
        *,
        lease_ms: int,
        reservation_id: str | None = None,
        hold_ms: int = 0,
    ) -> bool:
        keys = self.keys(job.tenant)
        held = await self._heartbeat(
            keys=[keys.leases, keys.resv_deadline],
            args=["", job.id, int(lease_ms), reservation_id or "", int(hold_ms)],
        )
        return bool(held)

    async def reclaim(
        self, tenant: str, *, max_attempts: int, limit: int = 1000, now_ms: int | None = None
    ) -> tuple[int, list[str]]:
        """Requeue jobs whose lease expired; returns (requeued, ids to dead-letter)."""
        keys = self.keys(tenant)
        reply = await self._reclaim(
            keys=[
                keys.leases,
                keys.queue,
                keys.jstate,
                keys.attempts,
                keys.bmeta,
                keys.queue_high,
                keys.queue_low,
            ],
            args=["" if now_ms is None else str(now_ms), int(max_attempts), int(limit)],
        )
        requeued = int(reply[0])
        if requeued:
            await self.activate(tenant, wake=1)
        return requeued, [str(x) for x in reply[1:]]

    async def job_body(self, tenant: str, jid: str) -> dict[str, Any] | None:
        """``{"batch_id", "custom_id", "params"}`` of a job, None when it is unknown."""
        raw = await self.redis.hget(self.keys(tenant).jobs, jid)
        if raw is None:
            return None
        batch_id, custom_id = split_job_id(jid)
        return {"batch_id": batch_id, "custom_id": custom_id, "params": parse_params(raw).params}

    async def wait_for_work(self, timeout_s: float) -> str | None:
        """Block until a producer signals work (or the timeout); returns the tenant named."""
        reply = await self.redis.blpop([self.sched.wake], timeout=max(timeout_s, 0.01))
        if reply is None:
            return None
        return str(reply[1])
