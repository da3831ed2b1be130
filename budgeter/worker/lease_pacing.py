"""Probe leases in the worker (issue 20): a job leased as its tenant's probe (the tenant
came due off a park) ends the probe hold at its admission decision, so the tenant's next
job is leased only then; a deferral re-parks the tenant instead (sched/park.lua)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from budgeter.queue.jobqueue import JobQueue, LeasedJob


class ProbeTracker:
    def __init__(self, queue: JobQueue, spawn: Callable[[Awaitable[None]], None]) -> None:
        self.queue = queue
        self.spawn = spawn
        self._open: set[str] = set()  # reservation ids of probes not yet decided

    def leased(self, jobs: list[LeasedJob]) -> None:
        self._open.update(job.reservation_id for job in jobs if job.probe)

    def decided(self, job: LeasedJob, kind: str) -> None:
        """At the probe's admission decision: end the hold unless it was deferred."""
        if job.reservation_id in self._open:
            self._open.discard(job.reservation_id)
            if kind != "DEFER":
                self.spawn(self._end(job.tenant, decided=True))

    async def done(self, job: LeasedJob, *, decided: bool = True) -> None:
        """The job ended (or was given back) before any decision: end the hold."""
        if job.reservation_id in self._open:
            self._open.discard(job.reservation_id)
            await self._end(job.tenant, decided=decided)

    async def _end(self, tenant: str, *, decided: bool) -> None:
        await self.queue.end_probe(tenant, decided=decided)
