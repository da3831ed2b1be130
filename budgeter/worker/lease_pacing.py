"""Lease pacing in the worker (issue 20): a job leased as its tenant's probe (the tenant
came due off a park) ends the probe hold at its admission decision, so the tenant's next
job is leased only then; a deferral re-parks the tenant instead (sched/park.lua). An
admission that leaves the tenant's request rate no room (the ADMIT's ``until_ms``) parks
the tenant until the bucket takes the next request, probe or not, so no job is leased
only to be deferred: released by its bucket, a tenant gets as many leases as it admits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from budgeter.admission.decision import Decision
from budgeter.queue.jobqueue import JobQueue, LeasedJob


class ProbeTracker:
    def __init__(self, queue: JobQueue, spawn: Callable[[Awaitable[None]], None]) -> None:
        self.queue = queue
        self.spawn = spawn
        self._open: set[str] = set()  # reservation ids of probes not yet decided

    def leased(self, jobs: list[LeasedJob]) -> None:
        self._open.update(job.reservation_id for job in jobs if job.probe)

    def decided(self, job: LeasedJob, decision: Decision) -> None:
        """At the job's admission decision: park the tenant when the ADMIT left its request
        rate no room (which ends a probe's hold too), else end a probe's hold unless it was
        deferred (the deferral parks it)."""
        probe = job.reservation_id in self._open
        self._open.discard(job.reservation_id)
        if decision.next_request_ms:
            self.spawn(self.queue.pace(job.tenant, decision.next_request_ms))
        elif probe and decision.kind != "DEFER":
            self.spawn(self._end(job.tenant, decided=True))

    async def done(self, job: LeasedJob, *, decided: bool = True) -> None:
        """The job ended (or was given back) before any decision: end the hold."""
        if job.reservation_id in self._open:
            self._open.discard(job.reservation_id)
            await self._end(job.tenant, decided=decided)

    async def _end(self, tenant: str, *, decided: bool) -> None:
        await self.queue.end_probe(tenant, decided=decided)
