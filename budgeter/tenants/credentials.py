"""Tenant API keys: created by the admin, shown once, stored only as SHA-256 hashes.

A key found valid is remembered in-process for ``KEY_CACHE_SECONDS`` after the lookup
that confirmed it (the API then authenticates without a Redis round trip); a key in use
past half that age is confirmed again in the background, so steady traffic never waits on
Redis here. Revoking a key or deleting its tenant drops it from this process's cache at
once; other processes stop accepting it within ``KEY_CACHE_SECONDS``. Unknown keys are
never cached: a new key works at once, and every failure still reaches Redis (and the
failed-authentication throttle).

A key whose tenant has no policy (deleted while the key remained) authenticates as
:class:`NoPolicyError`, never cached. The API records when a key last served a request
that succeeded (:meth:`KeyStore.note_use`: ``TenantKeys.api_keys_used``, at most once per
``LAST_USED_EVERY_S`` per key and process), so a refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT, FieldT

from budgeter.domain.key_limits import KeyLimits
from budgeter.store.keys import KeyScopeKeys, TenantKeys, key_index_key
from budgeter.store.scripts import register
from budgeter.store.types import RedisClient

log = logging.getLogger("budgeter.api")

KEY_PREFIX = "sk-bgt-"
KEY_CACHE_SECONDS = 1.0  # the bound on how long a revoked key still works elsewhere
KEY_CACHE_MAX = 10_000
LAST_USED_EVERY_S = 60.0  # the resolution of a key's "last used"


def hash_key(key: str) -> str:
    # a header value that was not UTF-8 reaches us with its bytes as lone surrogates
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str
    limited: bool = False  # the key has limits of its own (a scope under its tenant's)

    @property
    def scope_key(self) -> str | None:
        """What ``Admission.reserve(..., key=)`` takes: the key's id when it has limits."""
        return self.key_id if self.limited else None


class NoPolicyError(LookupError):
    """A valid key whose tenant has no policy (deleted while the key remained)."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant {tenant!r} not found: this key's tenant has no policy")
        self.tenant = tenant


def _clock() -> float:
    return time.monotonic()


class _PrincipalCache:
    """Valid keys of this process: (prefix, key hash) -> (principal, expiry on the
    monotonic clock: the start of the confirming lookup + the cache time). One per
    process, so a revocation through any KeyStore (the admin API, TenantStore.delete)
    drops the entry for every KeyStore of the process."""

    def __init__(self, max_entries: int = KEY_CACHE_MAX) -> None:
        self.max_entries = max_entries
        self.entries: dict[tuple[str, str], tuple[Principal, float]] = {}
        self.generation = 0  # bumped by every drop: a lookup racing a revocation stores nothing

    def get(self, prefix: str, digest: str, now: float) -> tuple[Principal, float] | None:
        """(principal, expiry) of a valid entry."""
        found = self.entries.get((prefix, digest))
        if found is None:
            return None
        if found[1] <= now:
            del self.entries[(prefix, digest)]
            return None
        return found

    def put(self, prefix: str, digest: str, principal: Principal, expires: float) -> None:
        if len(self.entries) >= self.max_entries:
            now = _clock()
            self.entries = {k: v for k, v in self.entries.items() if v[1] > now}
            while len(self.entries) >= self.max_entries:  # all fresh: drop the oldest
                del self.entries[next(iter(self.entries))]
        self.entries[(prefix, digest)] = (principal, expires)

    def drop(self, prefix: str, digests: list[str], tenant: str | None = None) -> None:
        self.generation += 1
        for digest in digests:
            self.entries.pop((prefix, digest), None)
        if tenant is not None:
            stale = [
                k for k, (who, _) in self.entries.items() if k[0] == prefix and who.tenant == tenant
            ]
            for k in stale:
                del self.entries[k]


_CACHE = _PrincipalCache()


class KeyStore:
    """``cache_s`` > 0 (the API): valid keys are remembered that long (see the module)."""

    def __init__(
        self, redis: RedisClient, *, prefix: str = "budgeter", cache_s: float = 0.0
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.index = key_index_key(prefix)
        self.cache_s = cache_s
        self._confirming: dict[str, asyncio.Task[None]] = {}
        self._used: dict[str, float] = {}  # key id -> when this process last recorded a use
        self._key_used = register(redis, "tenants/key_used.lua")

    async def create(
        self, tenant: str, *, name: str | None = None, limits: KeyLimits | None = None
    ) -> tuple[str, str]:
        """A new key for ``tenant``: returns (key id, key). The key is not kept. With
        ``limits`` (not empty), the key's scope policy and the tenant's ``limited_keys``
        are written, in one transaction with the key's record, before the key works."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        digest = hash_key(key)
        meta: dict[str, Any] = {
            "id": key_id,
            "created_at_ms": int(time.time() * 1000),
            "hint": key[-4:],
        }
        if name is not None:
            meta["name"] = name
        flat: dict[FieldT, EncodableT] = dict(limits.redis_fields().items()) if limits else {}
        if flat and limits:
            meta["limits"] = limits.model_dump(mode="json", exclude_defaults=True)
        keys = TenantKeys.of(self.prefix, tenant)
        async with self.redis.pipeline(transaction=True) as pipe:  # one slot: the tenant's
            pipe.hset(keys.api_keys, key_id, json.dumps(meta | {"hash": digest}))
            if flat:
                pipe.hset(KeyScopeKeys(self.prefix, tenant, key_id).policy, mapping=flat)
                pipe.sadd(keys.limited_keys, key_id)
            await pipe.execute()
        await self.redis.hset(self.index, digest, f"{tenant} {key_id}")
        return key_id, key

    async def _drop_scope(self, tenant: str, key_id: str) -> None:
        """Delete a key's limits and its scope's counters (in-flight reservations of the
        key then settle in its tenant's scopes only, which stay exact)."""
        scope = KeyScopeKeys(self.prefix, tenant, key_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(TenantKeys.of(self.prefix, tenant).limited_keys, key_id)
            pipe.delete(
                scope.policy,
                scope.buckets,
                scope.budget,
                scope.resv,
                scope.resv_deadline,
                scope.resv_sent,
                scope.usage,
                scope.state,
                scope.recent,
                scope.outbox,
            )
            await pipe.execute()

    async def list_keys(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's keys, oldest first: id, created_at_ms, last_used_at_ms (None: never
        used), hint. Never the key nor its hash."""
        keys_of = TenantKeys.of(self.prefix, tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hvals(keys_of.api_keys)
            pipe.hgetall(keys_of.api_keys_used)
            raw, used = await pipe.execute()
        keys = [json.loads(item) for item in raw]
        for key in keys:
            key.pop("hash", None)
            key.setdefault("limits", None)
            last = used.get(key["id"])
            key["last_used_at_ms"] = int(last) if last is not None else None
        return sorted(keys, key=lambda k: k["created_at_ms"])

    async def revoke(self, tenant: str, key_id: str) -> bool:
        keys = TenantKeys.of(self.prefix, tenant)
        raw = await self.redis.hget(keys.api_keys, key_id)
        if raw is None:
            return False
        digest = json.loads(raw)["hash"]
        _CACHE.drop(self.prefix, [digest])
        try:
            await self.redis.hdel(self.index, digest)
            await self.redis.hdel(keys.api_keys, key_id)
            await self.redis.hdel(keys.api_keys_used, key_id)
            await self._drop_scope(tenant, key_id)
        finally:
            _CACHE.drop(self.prefix, [digest])  # and what a racing lookup may have stored
        return True

    async def revoke_all(self, tenant: str) -> None:
        keys = TenantKeys.of(self.prefix, tenant)
        _CACHE.drop(self.prefix, [], tenant)
        try:
            for raw in await self.redis.hvals(keys.api_keys):
                record = json.loads(raw)
                await self.redis.hdel(self.index, record["hash"])
                if record.get("limits"):
                    await self._drop_scope(tenant, str(record["id"]))
            await self.redis.delete(keys.api_keys, keys.api_keys_used, keys.limited_keys)
        finally:
            _CACHE.drop(self.prefix, [], tenant)

    async def authenticate(self, key: str) -> Principal | None:
        if not key:
            return None
        digest = hash_key(key)
        if self.cache_s <= 0:
            return await self._lookup(digest)
        now = _clock()
        cached = _CACHE.get(self.prefix, digest, now)
        if cached is not None:
            principal, expires = cached
            if expires - now < self.cache_s / 2 and digest not in self._confirming:
                self._confirming[digest] = asyncio.create_task(self._confirm(digest))
            return principal
        return await self._lookup_and_remember(digest)

    async def _lookup_and_remember(self, digest: str) -> Principal | None:
        started = _clock()  # the bound runs from before the read
        generation = _CACHE.generation
        try:
            principal = await self._lookup(digest)
        except NoPolicyError:
            _CACHE.entries.pop((self.prefix, digest), None)  # its tenant was deleted
            raise
        if principal is None:
            _CACHE.entries.pop((self.prefix, digest), None)  # revoked elsewhere
        elif _CACHE.generation == generation:
            _CACHE.put(self.prefix, digest, principal, started + self.cache_s)
        return principal

    async def _confirm(self, digest: str) -> None:
        """Read a remembered key again in the background (revoked: forget it now)."""
        try:
            await self._lookup_and_remember(digest)
        except NoPolicyError:
            pass  # forgotten: the next request is told
        except Exception as exc:  # it simply expires; the next request reads Redis
            log.warning("could not confirm an API key: %s", type(exc).__name__)
        finally:
            self._confirming.pop(digest, None)

    async def aclose(self) -> None:
        """Stop the background confirmations (the app is shutting down)."""
        tasks = list(self._confirming.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _lookup(self, digest: str) -> Principal | None:
        found = await self.redis.hget(self.index, digest)
        if found is None:
            return None
        tenant, _, key_id = str(found).partition(" ")
        keys = TenantKeys.of(self.prefix, tenant)
        async with self.redis.pipeline(transaction=False) as pipe:  # one slot: the tenant's
            pipe.exists(keys.policy)
            pipe.sismember(keys.limited_keys, key_id)
            exists, limited = await pipe.execute()
        if not exists:
            raise NoPolicyError(tenant)
        return Principal(tenant, key_id, limited=bool(limited))

    async def note_use(self, principal: Principal) -> None:
        """Record that the key served a request (at most once per LAST_USED_EVERY_S per key
        in this process). A failure here never fails the request."""
        now = _clock()
        last = self._used.get(principal.key_id)
        if last is not None and now - last < LAST_USED_EVERY_S:
            return
        if len(self._used) >= KEY_CACHE_MAX:
            self._used.clear()
        self._used[principal.key_id] = now
        keys = TenantKeys.of(self.prefix, principal.tenant)
        try:
            await self._key_used(
                keys=[keys.api_keys, keys.api_keys_used],
                args=[principal.key_id, int(time.time() * 1000)],
            )
        except Exception as exc:
            self._used.pop(principal.key_id, None)
            log.warning("could not record a key's last use: %s", type(exc).__name__)
