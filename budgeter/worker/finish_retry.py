"""A worker that holds an upstream answer keeps it until Redis has it (issue 19).

After the upstream served a job, its settle (the reservation replaced by the real usage)
and its ack (the result stored, the terminal state) must reach Redis. When Redis, or the
cluster node of the tenant's slot, does not answer, giving the job back would serve it
again (and charge it again), and the client could end up with a refusal for a request
the upstream served. So :class:`AnswerKeeper` tries the steps that failed again, with
capped exponential backoff (jitter, injectable sleep), renewing the job's lease and
reservation before each new try when Redis lets it, until both succeeded, for as long
as it takes. Only a hard stop (the lane cancelled) ends it first: then one last try,
bounded in time, and the job is left to its lease (never given back).

Each step is idempotent when tried again, also when it ran on Redis and only its reply
was lost (or redis-py re-ran a pipeline after a connection error): ``settle.lua`` does
nothing for a reservation it no longer holds, ``ack.lua`` records a terminal state and
its result only for a job that has none yet (the result is one hash field per job id,
never appended).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ClusterDownError, ReadOnlyError, SlotNotCoveredError, TryAgainError

from budgeter.queue.jobqueue import JobQueue, LeasedJob
from budgeter.store.cluster_client import closed_under_us
from budgeter.store.outage import OUTAGE, UNREACHABLE, unreachable_cause

log = logging.getLogger("budgeter.worker")

S = TypeVar("S")
A = TypeVar("A")

# Redis could not take the call now, and will: away, failing over, a demoted master
RETRYABLE: tuple[type[BaseException], ...] = (
    *UNREACHABLE,  # ConnectionError, TimeoutError, BusyLoadingError, NotReplicated, OSError's
    ClusterDownError,  # CLUSTERDOWN, MASTERDOWN
    TryAgainError,  # a slot being moved
    SlotNotCoveredError,
    ReadOnlyError,  # a master demoted to replica, until the client follows
)

Sleep = Callable[[float], Awaitable[None]]


def is_retryable(exc: BaseException) -> bool:
    """Redis could not take the call now: away, failing over, or a connection that
    redis-py's cluster client closed under the call (budgeter/store/cluster_client.py)."""
    return isinstance(exc, RETRYABLE) or unreachable_cause(exc) is not None or closed_under_us(exc)


class AnswerKeeper:
    """Runs the settle and the ack of a job the upstream answered until Redis has both."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        lease_ms: int,
        hold_ms: int,
        sleep: Sleep = asyncio.sleep,
        base_s: float = 0.05,
        cap_s: float = 2.0,
        last_try_s: float = 5.0,
    ) -> None:
        self.queue = queue
        self.lease_ms = lease_ms
        self.hold_ms = hold_ms
        self.sleep = sleep
        self.base_s = base_s
        self.cap_s = cap_s
        self.last_try_s = last_try_s
        self._holding: set[tuple[str, int]] = set()  # (job id, attempt) holding an answer
        self.retried = 0  # tries after the first, over the process's life (tests, logs)
        self.last_tries = 0  # last tries made because the worker was stopped hard

    def holds(self, job: LeasedJob) -> bool:
        """True while ``job``'s answer is being kept: it must not be given back."""
        return (job.id, job.attempt) in self._holding

    def holds_any(self) -> bool:
        return bool(self._holding)

    async def settle_and_ack(
        self,
        job: LeasedJob,
        rid: str,
        settle: Callable[[], Awaitable[S]],
        ack: Callable[[], Awaitable[A]],
    ) -> tuple[S, A]:
        """``settle()`` and ``ack()`` together (one round trip when Redis answers), each
        tried again until it succeeds; their answers. A failure that is not Redis being
        away (a bug) is raised at once."""
        key = (job.id, job.attempt)
        self._holding.add(key)
        try:
            return await self._until_done(job, rid, settle, ack)
        finally:
            self._holding.discard(key)

    async def _until_done(
        self,
        job: LeasedJob,
        rid: str,
        settle: Callable[[], Awaitable[S]],
        ack: Callable[[], Awaitable[A]],
    ) -> tuple[S, A]:
        settled: list[S] = []
        acked: list[A] = []
        delay = self.base_s
        tries = 0
        lost = False
        try:
            while True:
                await self._try(settle, settled, ack, acked)
                if settled and acked:
                    if tries:
                        log.info(
                            "kept answer stored after Redis came back",
                            extra={"tenant": job.tenant, "job": job.id, "tries": tries + 1},
                        )
                    return settled[0], acked[0]
                if not tries:
                    log.warning(
                        "holding an upstream answer: Redis does not take its settle or "
                        "ack; trying again until it does",
                        extra={"tenant": job.tenant, "job": job.id},
                    )
                tries += 1
                self.retried += 1
                await self.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.cap_s)
                if not await self._renew(job, rid if not settled else None) and not lost:
                    lost = True
                    log.warning(
                        "lease lost while holding an upstream answer; storing it anyway",
                        extra={"tenant": job.tenant, "job": job.id},
                    )
        except asyncio.CancelledError:  # stopped hard: one last try, then the lease decides
            if not (settled and acked):
                self.last_tries += 1
                try:
                    await asyncio.wait_for(
                        self._try(settle, settled, ack, acked), timeout=self.last_try_s
                    )
                except Exception:
                    log.warning(
                        "stopped while holding an upstream answer that Redis did not take",
                        extra={"tenant": job.tenant, "job": job.id},
                    )
            raise

    async def _try(
        self,
        settle: Callable[[], Awaitable[S]],
        settled: list[S],
        ack: Callable[[], Awaitable[A]],
        acked: list[A],
    ) -> None:
        """One try of the steps not done yet (together); done ones append their answer."""
        steps: list[tuple[Callable[[], Awaitable[object]], list[object]]] = []
        if not settled:
            steps.append((settle, settled))  # type: ignore[arg-type]  # S and A are objects
        if not acked:
            steps.append((ack, acked))  # type: ignore[arg-type]
        answers = await asyncio.gather(*(step() for step, _ in steps), return_exceptions=True)
        failure: BaseException | None = None
        for (_, into), answer in zip(steps, answers, strict=True):
            if not isinstance(answer, BaseException):
                into.append(answer)
            elif is_retryable(answer):
                cause = unreachable_cause(answer)
                OUTAGE.unreachable(cause or answer)  # one line per interval, no traceback
            elif failure is None:
                failure = answer
        if failure is not None:
            raise failure

    async def _renew(self, job: LeasedJob, rid: str | None) -> bool:
        """Extend the job's lease (and its reservation, while not settled) if Redis
        answers; False only when the lease is lost, which changes nothing here: the answer
        is stored anyway (ack.lua takes it while the job has no terminal state)."""
        try:
            return await self.queue.heartbeat(
                job, lease_ms=self.lease_ms, reservation_id=rid, hold_ms=self.hold_ms
            )
        except Exception as exc:  # still away: the next try will tell
            if not is_retryable(exc):
                log.warning("lease renewal failed", extra={"job": job.id}, exc_info=True)
            return True
