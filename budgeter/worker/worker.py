"""The worker: take jobs fairly, count, admit, forward, settle, ack.

One dispatcher per process leases jobs while it has free slots (``concurrency``) and runs
each in its own task; idle, it blocks on the wake list until a producer signals work or
the earliest parked tenant is due. A maintenance loop reclaims expired leases, reaps
reservations of dead workers and refreshes the gauges that live in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from budgeter.admission.admission import Admission, Decision, Usage, format_ms
from budgeter.domain.messages import MessageParams, first_error
from budgeter.domain.passthrough import Passthrough
from budgeter.domain.policy import TENANT_ID_RE
from budgeter.domain.results import (
    BUDGET_ERROR_TYPE,
    REFUSAL_TYPES,
    canceled,
    error_body,
    errored,
    expired,
    succeeded,
)
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, LeasedJob
from budgeter.store.outage import WARN, log_failure
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient, UpstreamError
from budgeter.upstream.token_counter import TokenCounter
from budgeter.worker.finish_retry import AnswerKeeper
from budgeter.worker.heartbeat import Heartbeats
from budgeter.worker.lease_pacing import ProbeTracker
from budgeter.worker.reserving import reserve_or_defer

log = logging.getLogger("budgeter.worker")

PICKS_DRAIN_S = 10.0  # how long a drain waits for leases being taken or given back
ERROR_PAUSE_S = 1.0  # how long a lane sleeps after its pick or its loop failed


class _Retry:
    """A lane's lease answer: no job for you this round, but there is work."""


_RETRY = _Retry()
LeaseAnswer = LeasedJob | _Retry | None  # a job, try again, or no work (wait for it)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int = 16
    lease_ms: int = 60_000
    reservation_grace_ms: int = 30_000
    max_attempts: int = 5
    idle_max_s: float = 2.0
    settle_wait_fallback_ms: int = 5_000
    maintenance_interval_s: float = 5.0
    drain_s: float = 30.0
    results_retention_ms: int = 29 * 86_400_000
    prefix: str = "budgeter"

    @property
    def hold_ms(self) -> int:
        """A reservation outlives its job's lease by a grace period before it is reaped."""
        return self.lease_ms + self.reservation_grace_ms


class Worker:
    def __init__(
        self,
        *,
        redis: RedisClient,
        upstream: UpstreamClient,
        config: WorkerConfig,
        metrics: Metrics,
        counter: TokenCounter | None = None,
        admission: Admission | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.upstream = upstream
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.queue = JobQueue(redis, prefix=config.prefix)
        self.admission = admission or Admission(redis, prefix=config.prefix)
        self.tenants = TenantStore(redis, prefix=config.prefix)
        self.batches = BatchStore(redis, prefix=config.prefix)
        self.counter = counter or TokenCounter(redis, upstream, prefix=config.prefix, ttl_s=0)
        self._tasks: set[asyncio.Task[None]] = set()
        self.heartbeats = Heartbeats(self.queue, lease_ms=config.lease_ms, hold_ms=config.hold_ms)
        self._beating = self.heartbeats.beating  # the jobs in flight
        self.keeper = AnswerKeeper(self.queue, lease_ms=config.lease_ms, hold_ms=config.hold_ms)
        self._served: dict[str, tuple[int, int]] = {}  # tenant -> (tokens, jobs) since a pick
        self._lease_waiters: list[asyncio.Future[LeaseAnswer]] = []  # lanes asking for a job
        self._picking: set[asyncio.Task[None]] = set()
        self._idler: asyncio.Task[None] | None = None
        self._idle_wait_s = config.idle_max_s
        self._busy = 0  # lanes processing a job
        self.probes = ProbeTracker(self.queue, self._spawn)
        self.processed = 0

    # main loops ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain in-flight jobs (see :meth:`drain`).

        ``concurrency`` lanes each lease a job and process it, again and again. The leases
        the lanes ask for while the event loop runs one round are taken together, by one
        :meth:`JobQueue.pick_many` (one scheduler call, one dequeue per tenant), and jobs leased
        together move through counting, admission and settling together, so those calls
        share pipelines and script calls too."""
        maintenance = asyncio.create_task(self._maintenance_loop(stop), name="maintenance")
        lanes = [
            asyncio.create_task(self._lane(stop), name=f"lane-{i}")
            for i in range(self.config.concurrency)
        ]
        self._tasks.update(lanes)
        try:
            await stop.wait()
        finally:
            await self.drain()
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            self.heartbeats.cancel()

    async def _lane(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                job = await self._lease()
                if isinstance(job, _Retry):
                    continue
                if job is None:
                    await self._idle(stop)
                    continue
            except Exception:  # never lose a lane
                log_failure(log, "lane failed; retrying")
                await _sleep_or_stop(stop, ERROR_PAUSE_S)
                continue
            self._busy += 1
            try:
                await self._process(job)
            finally:
                self._busy -= 1
                await self.probes.done(job)

    async def _lease(self) -> LeaseAnswer:
        """A leased job; ``_RETRY``: others of the round got the jobs; None: no work."""
        future: asyncio.Future[LeaseAnswer] = asyncio.get_running_loop().create_future()
        self._lease_waiters.append(future)
        if len(self._lease_waiters) == 1:
            asyncio.get_running_loop().call_soon(self._start_pick)
        try:
            return await future
        except asyncio.CancelledError:  # cancelled (drain) just after its job was set
            if future.done() and not future.cancelled():
                job = future.result()
                if isinstance(job, LeasedJob):
                    self._spawn(self._give_back([job]))
            raise

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` beside the lanes (drain waits for it)."""
        task = asyncio.ensure_future(work)
        self._picking.add(task)
        task.add_done_callback(self._picking.discard)

    def _start_pick(self) -> None:
        waiters, self._lease_waiters = self._lease_waiters, []
        self._spawn(self._pick_for(waiters))

    async def _pick_for(self, waiters: list[asyncio.Future[LeaseAnswer]]) -> None:
        served, self._served = self._served, {}
        self._idle_wait_s = self.config.idle_max_s
        try:
            picks = await self.queue.pick_many(
                len(waiters), lease_ms=self.config.lease_ms, served=served
            )
        except Exception:
            log_failure(log, "pick failed; retrying")
            self._idle_wait_s = -1.0  # sleep, not wait for work
            jobs: list[LeasedJob] = []
        else:
            jobs = picks.jobs
            self.probes.leased(jobs)
            if not jobs and picks.next_parked_ms >= 0:
                due_s = (picks.next_parked_ms - picks.now_ms) / 1000
                self._idle_wait_s = min(self._idle_wait_s, max(due_s, 0.01))
        orphans = []
        for i, future in enumerate(waiters):
            job: LeaseAnswer = jobs[i] if i < len(jobs) else (_RETRY if jobs else None)
            if not future.done():
                future.set_result(job)
            elif isinstance(job, LeasedJob):  # its lane was cancelled (drain)
                orphans.append(job)
        await self._give_back(orphans)

    async def _give_back(self, jobs: list[LeasedJob]) -> None:
        """Jobs leased for cancelled lanes go back at the head, not counting an attempt."""
        for job in jobs:
            try:
                await self.queue.requeue(job, head=True, count_attempt=False)
                await self.queue.activate(job.tenant, wake=1)
                await self.probes.done(job, decided=False)
            except Exception:
                log_failure(log, "could not give a job back", extra={"job": job.id}, level=WARN)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Every lane with nothing to do waits on one shared wait for work, each no longer
        than its own pick said (a tenant parked until sooner, or 1 s after an error)."""
        wait_s = self._idle_wait_s
        if self._idler is None or self._idler.done():
            if wait_s < 0:
                self._idler = asyncio.create_task(_sleep_or_stop(stop, ERROR_PAUSE_S))
            else:
                self._idler = asyncio.create_task(self._wait_for_work(stop, wait_s))
        timeout_s = ERROR_PAUSE_S if wait_s < 0 else max(wait_s, 0.01)  # after an error: a pause
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._idler), timeout=timeout_s)

    async def _wait_for_work(self, stop: asyncio.Event, wait_s: float) -> None:
        waiter = asyncio.create_task(self.queue.wait_for_work(wait_s))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            if task not in done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if waiter in done and not waiter.cancelled() and waiter.exception() is None:
            tenant = waiter.result()
            # a producer in another language may only push its tenant's name
            if tenant and TENANT_ID_RE.fullmatch(tenant):
                with contextlib.suppress(Exception):
                    await self.queue.activate(tenant)

    async def drain(self) -> None:
        """Let in-flight jobs finish for ``drain_s``; give the rest back to their queues."""
        if not self._tasks:
            return
        log.info("draining", extra={"inflight": self._busy})
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.drain_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._picking:  # leases being taken or given back for lanes that are gone
            await asyncio.wait(set(self._picking), timeout=PICKS_DRAIN_S)

    async def _maintenance_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.maintain()
            except Exception:
                log_failure(log, "maintenance failed")
            jitter = random.uniform(0.8, 1.2)
            await _sleep_or_stop(stop, self.config.maintenance_interval_s * jitter)

    async def maintain(self, *, now_ms: int | None = None) -> None:
        """Reclaim expired leases, reap dead reservations, re-activate forgotten queues,
        delete batches past their retention. (The gauges that live in Redis are exported by
        the API process at scrape time, once per deployment, not by every worker.)"""
        tenants = await self.tenants.known()
        for tenant in tenants:
            try:
                await self._maintain_tenant(tenant, now_ms)
            except Exception:  # one tenant's trouble must not skip the others' upkeep
                log_failure(log, "maintenance of a tenant failed", extra={"tenant": tenant})
        reaped_globally = await self.admission.reap_global(now_ms=now_ms)
        if reaped_globally:
            log.warning(
                "reaped account reservations of a dead process", extra={"charged": reaped_globally}
            )

    async def _maintain_tenant(self, tenant: str, now_ms: int | None) -> None:
        """Reclaim, reap, re-activate and purge one tenant (its counters exported at 0)."""
        series = self.metrics.for_tenant(tenant)
        _, dead = await self.queue.reclaim(
            tenant, max_attempts=self.config.max_attempts, now_ms=now_ms
        )
        for jid in dead:
            await self._dead_letter_reclaimed(tenant, jid)
        reaped = await self.admission.reap(tenant, now_ms=now_ms)
        if reaped.charged_full:
            series.reaped["charged"].inc(reaped.charged_full)
        if reaped.released:
            series.reaped["released"].inc(reaped.released)
        if reaped.settled:
            log.warning(
                "reaped reservations of a dead worker",
                extra={
                    "tenant": tenant,
                    "charged": reaped.charged_full,
                    "released": reaped.released,
                },
            )
        if reaped.waiting_settle:
            await self.queue.activate(tenant, unpark=True, wake=1)
        if await self.queue.queued(tenant):
            await self.queue.activate(tenant)
        now = now_ms if now_ms is not None else int(self.clock() * 1000)
        await self.batches.purge_older_than(tenant, now - self.config.results_retention_ms)

    async def _dead_letter_reclaimed(self, tenant: str, jid: str) -> None:
        body = await self.queue.job_body(tenant, jid)
        if body is None:
            return
        message = f"job abandoned by its worker {self.config.max_attempts} times (lease expired)"
        if await self.queue.finish(
            tenant,
            jid,
            body["batch_id"],
            body["custom_id"],
            "errored",
            errored(error_body("api_error", message)),
            dead=True,
        ):
            self._count_outcome(tenant, "errored")
            self.metrics.for_tenant(tenant).dead_lettered.inc()

    # one job ------------------------------------------------------------------------

    async def _process(self, job: LeasedJob) -> None:
        try:
            await self._handle(job)
        except asyncio.CancelledError:
            # drain timed out: the job keeps its place; the attempt counts, so that its next
            # lease gets a fresh reservation id (this one was charged or released); an
            if not self.keeper.holds(job):  # upstream answer held is never given back
                await self.queue.requeue(job, head=True, count_attempt=True)
                await self.queue.activate(job.tenant, wake=1)
            raise
        except Exception:
            log_failure(log, "job failed", extra={"tenant": job.tenant, "job": job.id})
            try:
                await self._retry_or_dead(job, error_body("api_error", "internal error in worker"))
            except Exception:  # Redis away too: the lease expires and the job is reclaimed
                log_failure(log, "could not give the job back", extra={"job": job.id}, level=WARN)
        finally:
            self.processed += 1

    async def _handle(self, job: LeasedJob) -> None:
        lease = {"rid": ""}  # the heartbeat extends the reservation too, once there is one
        with self.heartbeats.beat_for(job, lease):
            await self._handle_leased(job, lease)

    async def _handle_leased(self, job: LeasedJob, lease: dict[str, str]) -> None:
        now_ms = int(self.clock() * 1000)
        if job.canceled:
            await self._finish(job, "canceled", canceled())
            return
        if job.orphaned:
            await self._finish(
                job, "errored", errored(error_body("not_found_error", "tenant has no policy"))
            )
            return
        if job.deadline_ms and now_ms >= job.deadline_ms:
            await self._finish(
                job, "expired", expired(f"its deadline {format_ms(job.deadline_ms)} passed")
            )
            return
        params = {k: v for k, v in job.params.items() if k != "stream"}
        problem = None if job.validated else _params_problem(params)  # validated by the API
        if problem:
            await self._finish(
                job, "errored", errored(error_body("invalid_request_error", problem))
            )
            return
        passthrough = await self.batches.passthrough(job.tenant, job.batch_id)  # betas, version
        try:
            input_tokens = await self.counter.count_for(job.tenant, params, passthrough)
        except UpstreamError as exc:
            await self._upstream_failed(job, exc)
            return

        model = str(params["model"])
        rid = job.reservation_id
        decision = await reserve_or_defer(self, job, rid, input_tokens, params)  # marked sent
        series = self.metrics.for_tenant(job.tenant)
        series.decision(decision.kind, decision.reason).inc()
        self.probes.decided(job, decision)
        if decision.kind == "DEFER":
            await self._defer(job, decision, model)
            return
        if decision.kind == "REJECT":
            await self._finish(job, "errored", errored(_refusal(decision, model)))
            return
        series.admission_wait.observe(max(0.0, (decision.now_ms - job.enqueued_ms) / 1000))
        lease["rid"] = rid
        await self._forward(job, params, rid, input_tokens, passthrough)

    async def _forward(
        self, job: LeasedJob, params: dict[str, Any], rid: str, input_tokens: int, p: Passthrough
    ) -> None:
        # The reservation was marked sent when it was made (sent_at_once): from here on a
        # crash, a reap or a cancel charges it in full, never under-counts.
        model = str(params["model"])
        try:
            message = await self.upstream.create_message(params, p)
        except UpstreamError as exc:
            if exc.maybe_served:  # sent, then no answer: it may have been billed
                await self.admission.charge_full(job.tenant, rid)
            else:  # the upstream refused or failed: it did not serve (nor bill) it
                await self.admission.release(job.tenant, rid)
            await self._upstream_failed(job, exc)
            return
        except asyncio.CancelledError:
            await self.admission.charge_full(job.tenant, rid)
            raise
        usage = Usage.from_message(message)
        # settle and record the result together (one round trip): a crash between the two
        # can only charge in full (the reaper) or serve again, never under-count
        settled, _ = await self.keeper.settle_and_ack(  # retried until Redis has both
            job, rid, lambda: self.admission.settle(job.tenant, rid, usage),
            lambda: self._finish(job, "succeeded", succeeded(message)),
        )  # fmt: skip
        tokens, jobs = self._served.get(job.tenant, (0, 0))
        self._served[job.tenant] = (tokens + usage.total, jobs + 1)
        usage.record(self.metrics, job.tenant, model, input_tokens + int(params["max_tokens"]))
        for tenant in await self.admission.to_wake(job.tenant, settled):  # theirs waited
            await self.queue.activate(tenant, unpark=True, wake=1)

    async def _defer(self, job: LeasedJob, decision: Decision, model: str) -> None:
        until = decision.until_ms
        if job.deadline_ms and until > job.deadline_ms:
            reason = (
                f"cannot be admitted before its deadline {format_ms(job.deadline_ms)}: "
                f"{decision.describe(model)}"
            )
            log.info(
                "expired: cannot be admitted before its deadline",
                extra={"tenant": job.tenant, "job": job.id, "reason": decision.reason},
            )
            await self._finish(job, "expired", expired(reason))
            return
        if until == 0:
            until = decision.now_ms + self.config.settle_wait_fallback_ms
            if job.deadline_ms:  # look again at the deadline, to expire it then
                until = min(until, job.deadline_ms)
        if await self.queue.defer(job, until) == "canceled":
            await self._finish(job, "canceled", canceled())

    async def _upstream_failed(self, job: LeasedJob, exc: UpstreamError) -> None:
        if exc.retryable:
            await self._retry_or_dead(job, exc.body)
        else:
            await self._finish(job, "errored", errored(exc.body))

    async def _retry_or_dead(self, job: LeasedJob, body: dict[str, Any]) -> None:
        if job.attempt >= self.config.max_attempts:
            await self._finish(job, "errored", errored(body), dead=True)
            self.metrics.for_tenant(job.tenant).dead_lettered.inc()
        elif await self.queue.retry_later(job) == "canceled":
            await self._finish(job, "canceled", canceled())

    async def _finish(
        self, job: LeasedJob, outcome: str, result: dict[str, Any], *, dead: bool = False
    ) -> None:
        if await self.queue.ack(job, outcome, result, dead=dead):
            self._count_outcome(job.tenant, outcome)

    def _count_outcome(self, tenant: str, outcome: str) -> None:
        self.metrics.for_tenant(tenant).job(outcome).inc()


def _refusal(decision: Decision, model: str) -> dict[str, Any]:
    if decision.reason == "unknown_tenant":
        return error_body("not_found_error", "tenant has no policy")
    if decision.reason_kind in REFUSAL_TYPES:  # whichever scope refused (key, parent)
        return error_body(REFUSAL_TYPES[decision.reason_kind][1], decision.describe(model))
    return error_body(BUDGET_ERROR_TYPE, decision.describe(model))


def _params_problem(params: dict[str, Any]) -> str | None:
    """What the Messages API requires (the model the Batches API validates with), for params
    stored untagged (budgeter/domain/job_params.py): a producer that wrote Redis directly."""
    try:
        MessageParams.model_validate(params)
    except ValidationError as exc:
        return first_error(exc)
    return None


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
