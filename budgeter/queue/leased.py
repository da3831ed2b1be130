"""A job as a worker holds it: :class:`LeasedJob`, read from ``queue/dequeue.lua``'s
reply (:func:`leased_jobs`), the same whether the lease is kept or given back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from budgeter.domain.job_params import parse_params
from budgeter.queue.batch_meta import parse_batch_meta
from budgeter.store.types import ScriptReply

log = logging.getLogger("budgeter.jobqueue")  # with the rest of the queue's lines


def split_job_id(jid: str) -> tuple[str, str]:
    """(batch id, custom id): batch ids never contain ':'."""
    batch_id, _, custom_id = jid.partition(":")
    return batch_id, custom_id


@dataclass(frozen=True, slots=True)
class LeasedJob:
    """A job taken from a queue: the worker holds its lease until it acks or requeues."""

    tenant: str
    id: str
    batch_id: str
    custom_id: str
    params: dict[str, Any]
    validated: bool  # its params carry the tag of this version's validation
    attempt: int
    enqueued_ms: int
    deadline_ms: int
    leased_at_ms: int
    canceled: bool = False
    orphaned: bool = False  # its tenant was deleted
    priority: str = "normal"
    probe: bool = False  # its tenant came due off a park: the worker ends the probe

    @property
    def reservation_id(self) -> str:
        return f"{self.id}#{self.attempt}"


def leased_jobs(tenant: str, reply: ScriptReply, *, probe: bool = False) -> list[LeasedJob]:
    """The jobs of a ``queue/dequeue.lua`` reply: ``[left, now, has_policy]`` then five
    fields a job (id, params, attempt, batch meta, canceled)."""
    now, has_policy = int(reply[1]), bool(int(reply[2]))
    jobs = []
    for i in range(3, len(reply), 5):
        jid, raw, attempt, meta, canceled = reply[i : i + 5]
        stored = parse_params(raw)
        if not stored.readable:  # a foreign producer's body: the worker ends the job
            log.warning("job %s has a body that is not a JSON object", jid)  # errored
        batch_id, custom_id = split_job_id(jid)
        shared = parse_batch_meta(meta)
        jobs.append(
            LeasedJob(
                tenant=tenant,
                id=jid,
                batch_id=batch_id,
                custom_id=custom_id,
                params=stored.params,
                validated=stored.validated,
                attempt=int(attempt),
                enqueued_ms=now if shared.enqueued_ms is None else shared.enqueued_ms,
                deadline_ms=shared.deadline_ms,
                leased_at_ms=now,
                canceled=bool(int(canceled)),
                orphaned=not has_policy,
                priority=shared.priority,
                probe=probe,
            )
        )
    return jobs
