"""Reading a tenant's ledger stream (``TenantKeys.ledger``): pages in time order with
filters, for ``GET /v1/usage/ledger``, ``GET /admin/ledger`` and ``budgeter usage``.

A page is read with XRANGE from the cursor (an entry id, exclusive) or ``since`` up to
``until``; filters (model, tag) are applied while reading, so a page may scan more entries
than it answers (at most ``scan`` per call) and then answers a cursor to go on from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel, Field

from budgeter.ledger.entry import LedgerEntry, parse_entry
from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient

MAX_PAGE = 1000
SCAN = 5000


class LedgerFilter(BaseModel):
    since_ms: int | None = None
    until_ms: int | None = None  # exclusive
    model: str | None = None
    tag: tuple[str, str] | None = None  # key, value

    def matches(self, entry: LedgerEntry) -> bool:
        if self.model is not None and entry.model != self.model:
            return False
        return self.tag is None or entry.tags.get(self.tag[0]) == self.tag[1]


class LedgerPage(BaseModel):
    entries: list[LedgerEntry]
    next_cursor: str | None = Field(
        default=None, description="Pass as cursor for the next page; null: no more."
    )


def _items(reply: Any) -> Sequence[tuple[Any, Any]]:  # noqa: ANN401 -- redis-py's reply
    return list(reply or [])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_page(
    redis: RedisClient,
    keys: TenantKeys,
    where: LedgerFilter,
    *,
    cursor: str | None = None,
    limit: int = 100,
    scan: int = SCAN,
) -> LedgerPage:
    """One page of at most ``limit`` entries matching ``where`` after ``cursor``."""
    limit = max(1, min(limit, MAX_PAGE))
    start = f"({cursor}" if cursor else (str(where.since_ms) if where.since_ms else "-")
    end = str(where.until_ms - 1) if where.until_ms else "+"
    found: list[LedgerEntry] = []
    scanned = 0
    while scanned < scan:
        batch = _items(await redis.xrange(keys.ledger, start, end, count=min(limit, scan)))
        if not batch:
            return LedgerPage(entries=found)
        for eid, fields in batch:
            scanned += 1
            entry = parse_entry(keys.tenant, eid, fields)
            if where.matches(entry):
                found.append(entry)
                if len(found) == limit:
                    return LedgerPage(entries=found, next_cursor=entry.id)
        start = f"({_text(batch[-1][0])}"
    return LedgerPage(entries=found, next_cursor=start[1:])


async def iter_entries(
    redis: RedisClient, keys: TenantKeys, where: LedgerFilter, *, page: int = 1000
) -> AsyncIterator[LedgerEntry]:
    """Every entry matching ``where``, in time order, read a page at a time."""
    cursor: str | None = None
    while True:
        got = await read_page(redis, keys, where, cursor=cursor, limit=page)
        for entry in got.entries:
            yield entry
        if got.next_cursor is None:
            return
        cursor = got.next_cursor
