"""Batches: creating one (index + atomic enqueue), reading its status and its results, and
what its jobs carry to the upstream besides their params (the creator's betas and
anthropic-version, in the batch's hash: ``betas`` as ``format_betas`` writes it,
``anthropic_version``)."""

from __future__ import annotations

import contextlib
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT, FieldT

from budgeter.domain import jsonio
from budgeter.domain.jobs import DEFAULT_TTL_MS
from budgeter.domain.messages import BatchRequest
from budgeter.domain.passthrough import NO_PASSTHROUGH, Passthrough, format_betas, parse_betas
from budgeter.notify.queue_events import cancel_keys, hint
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.store.durability import NotReplicated
from budgeter.store.keys import TenantKeys, batch_index_key
from budgeter.store.scripts import register
from budgeter.store.types import RedisClient

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PASSTHROUGH_ENTRIES = 4096  # batches whose pass-through a process remembers
BETAS_FIELD = "betas"
VERSION_FIELD = "anthropic_version"
TAGS_FIELD = "tags"  # the batch's budgeter-tags, a JSON object (budgeter/ledger/tags.py)
KEY_FIELD = "key"  # the id of the API key the batch was created with
KEY_LIMITED_FIELD = "key_limited"  # '1': that key had limits of its own


def new_batch_id() -> str:
    return "msgbatch_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class BatchNotFoundError(LookupError):
    pass


class BatchNotEndedError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class BatchStatus:
    id: str
    tenant: str
    created_ms: int
    expires_ms: int
    ended_ms: int | None
    cancel_initiated_ms: int | None
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

    @property
    def processing_status(self) -> str:
        if self.ended:
            return "ended"
        return "canceling" if self.cancel_initiated_ms else "in_progress"


class BatchStore:
    def __init__(self, redis: RedisClient, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self.queue = JobQueue(redis, prefix=prefix)
        self._cancel = register(redis, "batch/cancel.lua")
        self._delete = register(redis, "batch/delete.lua")
        self._passthrough: OrderedDict[tuple[str, str], Passthrough] = OrderedDict()

    async def create(
        self,
        tenant: str,
        requests: list[BatchRequest],
        *,
        batch_id: str | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
        priority: str = "normal",
        passthrough: Passthrough = NO_PASSTHROUGH,
    ) -> str:
        """Queue every request of the batch in one atomic step; returns the batch id.
        ``ttl_ms`` is every job's deadline (after it, a job not yet served is expired);
        ``priority`` (high, normal, low) orders the tenant's own jobs; ``passthrough``'s
        betas and version go upstream with every job (its query does not)."""
        new = batch_id is None  # a retried submission of a given id adds what is missing
        batch_id = batch_id or new_batch_id()
        index = batch_index_key(self.prefix)
        batch_key = TenantKeys.of(self.prefix, tenant).batch(batch_id)
        await self.redis.hset(index, batch_id, tenant)
        fields: dict[FieldT, EncodableT] = {}
        if passthrough.betas:
            fields[BETAS_FIELD] = format_betas(passthrough.betas)
        if passthrough.version:
            fields[VERSION_FIELD] = passthrough.version
        if passthrough.tags:
            fields[TAGS_FIELD] = jsonio.dumps_str(dict(passthrough.tags))
        if passthrough.key:
            fields[KEY_FIELD] = passthrough.key
            if passthrough.key_limited:
                fields[KEY_LIMITED_FIELD] = "1"
        if fields:  # before the jobs: no worker can take one without them
            await self.redis.hset(batch_key, mapping=fields)
        # validated BatchRequests: the worker does not validate their params again
        jobs = [NewJob(r.custom_id, r.params_dict(), validated=True) for r in requests]
        try:
            await self.queue.submit(tenant, batch_id, jobs, ttl_ms=ttl_ms, priority=priority)
        except NotReplicated:
            if new:  # the caller hears "not created" (503): it must not run, nor be billed
                await self._undo_unreplicated(tenant, batch_id)
            raise
        except Exception:
            if await self.redis.hget(batch_key, "expires_ms") is None:  # never created
                await self.redis.delete(batch_key)
                await self.redis.hdel(index, batch_id)
            raise
        return batch_id

    async def _undo_unreplicated(self, tenant: str, batch_id: str) -> None:
        """A new batch the master queued but too few replicas acknowledged (see
        budgeter/store/durability.py): canceled and deleted (best effort: a job leased
        meanwhile keeps the canceled batch until it ends; a failover loses it all anyway)."""
        with contextlib.suppress(Exception):
            await self.cancel(batch_id, tenant=tenant, notify=False)
        with contextlib.suppress(Exception):
            await self.delete(batch_id, tenant=tenant)

    async def passthrough(self, tenant: str, batch_id: str) -> Passthrough:
        """What the batch's jobs carry upstream; read once per batch and process (it never
        changes), at most ``PASSTHROUGH_ENTRIES`` batches remembered."""
        found = self._passthrough.get((tenant, batch_id))
        if found is not None:
            self._passthrough.move_to_end((tenant, batch_id))
            return found
        key = TenantKeys.of(self.prefix, tenant).batch(batch_id)
        betas, version, tags, api_key, limited = await self.redis.hmget(
            key, [BETAS_FIELD, VERSION_FIELD, TAGS_FIELD, KEY_FIELD, KEY_LIMITED_FIELD]
        )
        try:
            found = Passthrough(
                parse_betas([str(betas or "")]),
                str(version) if version else None,
                tags=tuple((str(k), str(v)) for k, v in jsonio.loads(tags).items()) if tags else (),
                key=str(api_key) if api_key else None,
                key_limited=bool(api_key) and str(limited) == "1",
            )
        except (ValueError, AttributeError):  # written by hand or by a foreign producer: send none
            found = NO_PASSTHROUGH
        self._passthrough[(tenant, batch_id)] = found
        while len(self._passthrough) > PASSTHROUGH_ENTRIES:
            self._passthrough.popitem(last=False)
        return found

    async def tenant_of(self, batch_id: str) -> str:
        tenant = await self.redis.hget(batch_index_key(self.prefix), batch_id)
        if tenant is None:
            raise BatchNotFoundError(f"batch {batch_id!r} not found")
        return str(tenant)

    async def status(self, batch_id: str, *, tenant: str | None = None) -> BatchStatus:
        """The batch's status; with ``tenant``, another tenant's batch is not found."""
        owner = await self.tenant_of(batch_id)
        if tenant is not None and owner != tenant:
            raise BatchNotFoundError(f"batch {batch_id!r} not found")
        raw = await self.redis.hgetall(TenantKeys.of(self.prefix, owner).batch(batch_id))
        if not raw:
            raise BatchNotFoundError(f"batch {batch_id!r} not found")
        return _status(batch_id, owner, _texts(raw))

    async def list_batches(
        self,
        tenant: str,
        *,
        limit: int = 20,
        before_id: str | None = None,
        after_id: str | None = None,
    ) -> tuple[list[BatchStatus], bool]:
        """A page of the tenant's batches, newest first; returns (page, has_more)."""
        keys = TenantKeys.of(self.prefix, tenant)
        if after_id is not None:
            rank = await self._rank(keys, after_id)
            ids = await self.redis.zrevrange(keys.batches, rank + 1, rank + limit + 1)
            has_more = len(ids) > limit
            ids = ids[:limit]
        elif before_id is not None:
            rank = await self._rank(keys, before_id)
            start = max(0, rank - limit)
            ids = await self.redis.zrevrange(keys.batches, start, rank - 1) if rank else []
            has_more = start > 0
        else:
            ids = await self.redis.zrevrange(keys.batches, 0, limit)
            has_more = len(ids) > limit
            ids = ids[:limit]
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(keys.batch(str(batch_id)))
            raws = await pipe.execute()
        page = [_status(str(b), tenant, raw) for b, raw in zip(ids, raws, strict=True) if raw]
        return page, has_more

    async def _rank(self, keys: TenantKeys, batch_id: str) -> int:
        rank = await self.redis.zrevrank(keys.batches, batch_id)
        if rank is None:
            raise BatchNotFoundError(f"batch {batch_id!r} not found")
        return int(rank)  # type: ignore[arg-type]  # ZREVRANK without WITHSCORE: an int

    async def cancel(self, batch_id: str, *, tenant: str, notify: bool = True) -> BatchStatus:
        """Queued jobs end as canceled now; leased ones finish as they are. A cancel that
        ends the batch appends ``batch.ended`` (``notify=False``: not for a batch undone)."""
        await self.status(batch_id, tenant=tenant)
        keys = TenantKeys.of(self.prefix, tenant)
        _, events = await self._cancel(
            keys=cancel_keys(keys, batch_id, notify=notify), args=["", batch_id]
        )
        await hint(self.redis, self.prefix, tenant, int(events))
        # a tenant parked for a rate window may hold jobs of this batch: let them drain now
        await self.queue.activate(tenant, unpark=True, wake=1)
        return await self.status(batch_id, tenant=tenant)

    async def delete(self, batch_id: str, *, tenant: str) -> None:
        await self.status(batch_id, tenant=tenant)
        keys = TenantKeys.of(self.prefix, tenant)
        try:
            await self._delete(
                keys=[
                    keys.batch(batch_id),
                    keys.batch_jobs(batch_id),
                    keys.batches,
                    keys.jobs,
                    keys.jstate,
                    keys.attempts,
                    keys.results,
                    keys.bmeta,
                    keys.canceled_batches,
                ],
                args=[batch_id],
            )
        except Exception as exc:
            if "not_ended" in str(exc):
                raise BatchNotEndedError(
                    f"batch {batch_id!r} is still processing; cancel it or wait until it ends"
                ) from None
            if "not_found" in str(exc):  # deleted meanwhile (the client, another worker)
                raise BatchNotFoundError(f"batch {batch_id!r} not found") from None
            raise
        await self.redis.hdel(batch_index_key(self.prefix), batch_id)

    async def purge_older_than(self, tenant: str, created_before_ms: int) -> int:
        """Delete the tenant's ended batches created before the given time (retention)."""
        keys = TenantKeys.of(self.prefix, tenant)
        purged = 0
        for batch_id in await self.redis.zrangebyscore(keys.batches, "-inf", created_before_ms):
            try:
                await self.delete(str(batch_id), tenant=tenant)
                purged += 1
            except (BatchNotEndedError, BatchNotFoundError):
                continue
        return purged

    async def results(
        self, batch_id: str, *, tenant: str | None = None, chunk: int = 500
    ) -> AsyncIterator[dict[str, Any]]:
        """Result lines in submission order, read in chunks (never the whole batch)."""
        async for raw in self.raw_results(batch_id, tenant=tenant, chunk=chunk):
            yield jsonio.loads(raw)

    async def raw_results(
        self, batch_id: str, *, tenant: str | None = None, chunk: int = 500
    ) -> AsyncIterator[str]:
        """Result lines as stored (JSON text), in submission order, chunk by chunk."""
        tenant = (await self.status(batch_id, tenant=tenant)).tenant
        keys = TenantKeys.of(self.prefix, tenant)
        prefix = batch_id + ":"
        index = 0
        while True:  # each element: a JSON array of up to 1,000 custom ids
            block = await self.redis.lrange(keys.batch_jobs(batch_id), index, index + 15)
            if not block:
                return
            for packed in block:
                ids = [prefix + cid for cid in jsonio.loads(packed)]
                for start in range(0, len(ids), chunk):
                    for line in await self.redis.hmget(keys.results, ids[start : start + chunk]):
                        if line is not None:
                            yield str(line)
            index += len(block)


def _texts(raw: Mapping[str | bytes, str | bytes]) -> dict[str, str]:
    """A hash as redis-py answers it with decode_responses (every field and value a str)."""
    return {str(field): str(value) for field, value in raw.items()}


def _status(batch_id: str, tenant: str, raw: dict[str, str]) -> BatchStatus:
    def optional(name: str) -> int | None:
        return int(raw[name]) if raw.get(name) else None

    return BatchStatus(
        id=batch_id,
        tenant=tenant,
        created_ms=int(raw["created_ms"]),
        expires_ms=int(raw["expires_ms"]),
        ended_ms=optional("ended_ms"),
        cancel_initiated_ms=optional("cancel_initiated_ms"),
        processing=int(raw.get("processing", 0)),
        succeeded=int(raw.get("succeeded", 0)),
        errored=int(raw.get("errored", 0)),
        canceled=int(raw.get("canceled", 0)),
        expired=int(raw.get("expired", 0)),
    )
