"""One heartbeat loop for every job a worker has in flight (not a task per job)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from budgeter.queue.jobqueue import JobQueue, LeasedJob
from budgeter.store.outage import log_failure

log = logging.getLogger("budgeter.worker")

# (job id, attempt) -> (job, lease, last beat or start); the lease dict carries the
# reservation id ("rid") once there is one, so the beat extends the reservation too
Beating = dict[tuple[str, int], tuple[LeasedJob, dict[str, str], float]]


class Heartbeats:
    """Each job's lease (and reservation) is extended once a third of a lease has passed
    since its start or its last beat, looked at every sixth of a lease.

    ``clock`` (seconds, the event loop's by default) and ``sleep`` are injected so a test
    can step the loop through its looks without waiting."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        lease_ms: int,
        hold_ms: int,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.queue = queue
        self.lease_ms = lease_ms
        self.hold_ms = hold_ms
        self.clock = clock
        self.sleep = sleep
        self.beating: Beating = {}
        self._task: asyncio.Task[None] | None = None

    def _now(self) -> float:
        return self.clock() if self.clock is not None else asyncio.get_running_loop().time()

    @contextmanager
    def beat_for(self, job: LeasedJob, lease: dict[str, str]) -> Iterator[None]:
        """Keep ``job`` leased while the block runs."""
        key = (job.id, job.attempt)
        self.beating[key] = (job, lease, self._now())
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="heartbeat")
        try:
            yield
        finally:
            self.beating.pop(key, None)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        interval = self.lease_ms / 3000
        try:
            while self.beating:
                await self.sleep(interval / 2)
                now = self._now()
                due = [
                    (key, job, lease)
                    for key, (job, lease, last) in list(self.beating.items())
                    if now - last >= interval
                ]
                for key, job, lease in due:
                    if key in self.beating:
                        self.beating[key] = (job, lease, now)
                held = await asyncio.gather(
                    *(self._beat(job, lease) for _, job, lease in due),
                    return_exceptions=True,
                )
                for (key, job, _), ok in zip(due, held, strict=True):
                    if ok is False:
                        log.warning(
                            "lease lost while the upstream call runs", extra={"job": job.id}
                        )
                        self.beating.pop(key, None)
        finally:
            self._task = None

    async def _beat(self, job: LeasedJob, lease: dict[str, str]) -> bool | None:
        """False when the lease is lost; None when Redis could not be asked."""
        try:
            return await self.queue.heartbeat(
                job,
                lease_ms=self.lease_ms,
                reservation_id=lease["rid"] or None,
                hold_ms=self.hold_ms,
            )
        except Exception:
            log_failure(log, "heartbeat failed", extra={"job": job.id}, level=logging.WARNING)
            return None
