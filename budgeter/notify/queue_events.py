"""The queue scripts that append notification events (``queue/ack.lua``: ``job.dead_lettered``
and ``batch.ended``; ``batch/cancel.lua``: ``batch.ended``): their KEYS, which include the
tenant's policy (events only with a ``notify`` field, as admission/settle.lua decides) and
its outbox, all on the tenant's slot; and the delivery hint once a call appended events."""

from __future__ import annotations

import logging

from budgeter.store.keys import TenantKeys, notify_pending_key
from budgeter.store.scripts import round_pipeline
from budgeter.store.types import RedisClient

log = logging.getLogger("budgeter.notify")


def ack_keys(keys: TenantKeys, batch_id: str) -> list[str]:
    """queue/ack.lua's KEYS for a job of ``batch_id``."""
    return [
        keys.leases,
        keys.jstate,
        keys.results,
        keys.batch(batch_id),
        keys.dead,
        keys.outcomes,
        keys.jobs,
        keys.attempts,
        keys.policy,
        keys.outbox,
    ]


def cancel_keys(keys: TenantKeys, batch_id: str, *, notify: bool = True) -> list[str]:
    """batch/cancel.lua's KEYS; ``notify=False`` leaves the outbox out (no event)."""
    names = [
        keys.batch(batch_id),
        keys.batch_jobs(batch_id),
        keys.jstate,
        keys.results,
        keys.jobs,
        keys.canceled_batches,
        keys.outcomes,
    ]
    return [*names, keys.policy, keys.outbox] if notify else names


async def hint(redis: RedisClient, prefix: str, tenant: str, events: int) -> None:
    """Name the tenant for delivery after a script appended ``events`` (> 0). Best effort:
    the script's work is done and must not be retried for this; a hint lost here is found
    by the delivery's sweep of every tenant (budgeter.notify.outbox)."""
    if events <= 0:
        return
    try:  # in the client's round pipeline: the hints of one round share a trip
        await round_pipeline(redis).command("SADD", notify_pending_key(prefix), tenant)
    except Exception as exc:  # the {notify} slot's node away: the sweep finds the events
        log.warning("notification hint not written: %s", type(exc).__name__)
