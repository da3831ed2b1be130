"""Batches: creating one (index + atomic enqueue), reading its status and its results."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from budgeter.jobqueue import JobQueue, NewJob
from budgeter.keys import TenantKeys, batch_index_key
from budgeter.models import BatchRequest

DEFAULT_TTL_MS = 24 * 3600 * 1000
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def new_batch_id() -> str:
    return "msgbatch_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class BatchNotFoundError(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class BatchStatus:
    id: str
    tenant: str
    created_ms: int
    expires_ms: int
    ended_ms: int | None
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int

    @property
    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired

    @property
    def ended(self) -> bool:
        return self.processing == 0


class BatchStore:
    def __init__(self, redis: Any, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self.queue = JobQueue(redis, prefix=prefix)

    async def create(
        self,
        tenant: str,
        requests: list[BatchRequest],
        *,
        batch_id: str | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> str:
        """Queue every request of the batch in one atomic step; returns the batch id."""
        batch_id = batch_id or new_batch_id()
        index = batch_index_key(self.prefix)
        await self.redis.hset(index, batch_id, tenant)
        jobs = [NewJob(r.custom_id, r.params_dict()) for r in requests]
        try:
            await self.queue.submit(tenant, batch_id, jobs, ttl_ms=ttl_ms)
        except Exception:
            if not await self.redis.exists(TenantKeys.of(self.prefix, tenant).batch(batch_id)):
                await self.redis.hdel(index, batch_id)
            raise
        return batch_id

    async def tenant_of(self, batch_id: str) -> str:
        tenant = await self.redis.hget(batch_index_key(self.prefix), batch_id)
        if tenant is None:
            raise BatchNotFoundError(f"batch {batch_id!r} not found")
        return str(tenant)

    async def status(self, batch_id: str) -> BatchStatus:
        tenant = await self.tenant_of(batch_id)
        raw = await self.redis.hgetall(TenantKeys.of(self.prefix, tenant).batch(batch_id))
        if not raw:
            raise BatchNotFoundError(f"batch {batch_id!r} not found")
        return BatchStatus(
            id=batch_id,
            tenant=tenant,
            created_ms=int(raw["created_ms"]),
            expires_ms=int(raw["expires_ms"]),
            ended_ms=int(raw["ended_ms"]) if raw.get("ended_ms") else None,
            processing=int(raw.get("processing", 0)),
            succeeded=int(raw.get("succeeded", 0)),
            errored=int(raw.get("errored", 0)),
            canceled=int(raw.get("canceled", 0)),
            expired=int(raw.get("expired", 0)),
        )

    async def results(self, batch_id: str, *, chunk: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Result lines in submission order, read in chunks (never the whole batch)."""
        tenant = await self.tenant_of(batch_id)
        keys = TenantKeys.of(self.prefix, tenant)
        start = 0
        while True:
            ids = await self.redis.lrange(keys.batch_jobs(batch_id), start, start + chunk - 1)
            if not ids:
                return
            for line in await self.redis.hmget(keys.results, ids):
                if line is not None:
                    yield json.loads(line)
            start += chunk
