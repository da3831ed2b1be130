"""A job's reservation, made right before its upstream call.

With ``BUDGETER_REDIS_WAIT_REPLICAS`` the reservation must be on enough replicas before
the upstream is called (budgeter/store/durability.py). When it is not, ``Admission``
has released it and raises :class:`NotReplicated`; here that becomes a DEFER of one
second (reason ``not_replicated``): the worker puts the job back at the head of its queue
and parks its tenant, with no attempt counted and the upstream not called. A replication
hiccup then neither spins the worker nor uses up the job's attempts, and the job is
served once the replicas answer again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from budgeter.admission.admission import Decision
from budgeter.admission.fallback import fallback_models_of, reserve_with_fallback
from budgeter.ledger.tags import job_meta
from budgeter.store.durability import NotReplicated
from budgeter.store.outage import OUTAGE

if TYPE_CHECKING:
    from budgeter.queue.jobqueue import LeasedJob
    from budgeter.worker.worker import Worker

NOT_REPLICATED = "not_replicated"
NOT_REPLICATED_RETRY_MS = 1000


async def reserve_or_defer(
    worker: Worker, job: LeasedJob, rid: str, input_tokens: int, params: dict[str, Any]
) -> Decision:
    """The reservation of ``job`` (id ``rid``), marked sent at once (the upstream is
    called next, with no wait between); a DEFER when the replicas did not acknowledge it.
    Admitted as the tenant's fallback model (budgeter/admission/fallback.py), ``params``
    get that model: the upstream call, the result's message and the usage are its."""
    batch = await worker.batches.passthrough(job.tenant, job.batch_id)  # remembered: no call
    meta = job_meta(job.batch_id, job.custom_id, dict(batch.tags), params)
    if batch.key:  # the batch's API key: its jobs are charged to it (per-key usage)
        meta["k"] = batch.key
    try:
        decision, served = await reserve_with_fallback(
            worker.admission,
            job.tenant,
            rid,
            input_tokens,
            int(params["max_tokens"]),
            model=str(params["model"]),
            fallback_models=fallback_models_of(worker.tenants).lookup(job.tenant),
            hold_ms=worker.config.hold_ms,
            sent_at_once=True,
            key=batch.scope_key,  # the key's own scope, when it had limits
            meta=meta,
        )
        if decision.kind == "ADMIT":
            params["model"] = served
        return decision
    except NotReplicated as exc:
        OUTAGE.unreachable(exc)  # one line per interval, as when Redis does not answer
        now_ms = int(worker.clock() * 1000)
        return Decision("DEFER", now_ms + NOT_REPLICATED_RETRY_MS, NOT_REPLICATED, now_ms)
