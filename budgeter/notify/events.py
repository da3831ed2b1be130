"""Notification events (issue 18, item 4): what happened, to whom, as one entry of the
tenant's outbox stream (``{t:<tenant>}:outbox``, on the tenant's slot, so the scripts that
detect an event can append it in the same call). This module is the one home of the
entry's fields (``type`` and ``data``, JSON) and of the JSON body a webhook receives.

What each type's ``data`` carries, and which script appends it (in the same call as the
change it tells, only for a tenant whose policy has ``notify``: lib/events.lua):

- ``budget.threshold`` / ``budget.exhausted`` (admission/settle.lua): ``budget`` (the
  counter: ``day``, ``usd:month``, ``m:<model>:day``), ``period``, ``threshold``, ``used``,
  ``limit``.
- ``batch.ended`` (queue/ack.lua for the batch's last job, batch/cancel.lua when a cancel
  ends it): ``batch_id`` and ``request_counts`` (:data:`REQUEST_COUNTS`, jobs per state).
- ``job.dead_lettered`` (queue/ack.lua storing a dead-lettered job's result):
  :data:`DEAD_LETTERED_FIELDS`, ``error_type`` the Anthropic error type of its result
  (null when it has none) and ``attempts`` those it used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

from budgeter.admission.admission import format_ms
from budgeter.domain.messages import JsonValue

EventType = Literal[
    "budget.threshold", "budget.exhausted", "batch.ended", "job.dead_lettered", "test"
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
REQUEST_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")
DEAD_LETTERED_FIELDS = ("job_id", "batch_id", "custom_id", "error_type", "attempts")


class BadEventError(ValueError):
    """An outbox entry this version cannot read (it is delivered as ``unknown``)."""


@dataclass(frozen=True, slots=True)
class Event:
    tenant: str
    stream_id: str  # the outbox entry's id: "<ms>-<seq>" (its time is Redis's)
    type: str
    data: dict[str, JsonValue]

    @property
    def id(self) -> str:
        """Stable across redeliveries, for the receiver's de-duplication."""
        return f"evt_{self.tenant}_{self.stream_id}"

    @property
    def created_ms(self) -> int:
        return int(self.stream_id.split("-", 1)[0])

    def body(self) -> dict[str, JsonValue]:
        """The JSON a webhook receives."""
        return {
            "id": self.id,
            "type": self.type,
            "created_at": format_ms(self.created_ms, precise=True),
            "tenant": self.tenant,
            "data": self.data,
        }

    def text(self) -> str:
        """One sentence, for a Slack-compatible ``{"text": ...}``."""
        d = self.data
        if self.type == "budget.threshold":
            return (
                f"budgeter: tenant {self.tenant} has used {_pct(d.get('threshold'))} of its "
                f"{d.get('budget', 'budget')} ({d.get('used')} of {d.get('limit')})"
            )
        if self.type == "budget.exhausted":
            return f"budgeter: tenant {self.tenant} exhausted its {d.get('budget', 'budget')}"
        if self.type == "batch.ended":
            counts = d.get("request_counts")
            told = counts if isinstance(counts, dict) else {}
            each = ", ".join(f"{told[k]} {k}" for k in REQUEST_COUNTS[1:] if told.get(k))
            return f"budgeter: batch {d.get('batch_id')} of {self.tenant} ended: {each or 'empty'}"
        if self.type == "job.dead_lettered":
            return (
                f"budgeter: job {d.get('custom_id')} of batch {d.get('batch_id')} "
                f"({self.tenant}) was dead-lettered after {d.get('attempts')} attempts "
                f"({d.get('error_type')})"
            )
        return f"budgeter: {self.type} for tenant {self.tenant}"


def _pct(value: JsonValue) -> str:
    return f"{float(value) * 100:g} %" if isinstance(value, int | float) else "?"


def format_fields(event_type: str, data: dict[str, JsonValue]) -> dict[str, str]:
    """An outbox entry's fields (Lua producers write the same two)."""
    if event_type not in EVENT_TYPES:
        raise BadEventError(f"unknown event type {event_type!r}")
    return {"type": event_type, "data": json.dumps(data, separators=(",", ":"))}


def parse_fields(tenant: str, stream_id: str, fields: dict[str, str]) -> Event:
    """An outbox entry read back (format_fields' inverse)."""
    try:
        data = json.loads(fields.get("data") or "{}")
    except ValueError:
        data = {"raw": fields.get("data", "")}
    if not isinstance(data, dict):
        data = {"value": data}
    kind = fields.get("type", "unknown")
    return Event(tenant, stream_id, kind if kind in EVENT_TYPES else "unknown", data)
