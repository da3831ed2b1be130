"""A batch's meta value in the tenant's ``bmeta`` hash: what every job of the batch
shares, stored once per batch and read by ``queue/dequeue.lua``, ``requeue.lua`` and
``reclaim.lua``::

    '<enqueued ms> <deadline ms> [priority]'

(Redis server time; the priority is high | normal | low, absent = normal.)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PRIORITY = "normal"


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """``enqueued_ms`` is None when the value does not hold a number there (a foreign
    producer's); a missing or unreadable deadline is 0."""

    enqueued_ms: int | None
    deadline_ms: int
    priority: str = DEFAULT_PRIORITY


def format_batch_meta(meta: BatchMeta) -> str:
    text = f"{meta.enqueued_ms} {meta.deadline_ms}"
    return text if meta.priority == DEFAULT_PRIORITY else f"{text} {meta.priority}"


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def parse_batch_meta(value: str | bytes) -> BatchMeta:
    """Never raises: the parts that cannot be read take their defaults."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    parts = text.split(" ")
    deadline = _int(parts[1]) if len(parts) > 1 else None
    priority = parts[2] if len(parts) > 2 else DEFAULT_PRIORITY
    return BatchMeta(_int(parts[0]), deadline or 0, priority)
