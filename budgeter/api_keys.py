"""Tenant API keys: created by the admin, shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from budgeter.keys import TenantKeys, key_index_key

KEY_PREFIX = "sk-bgt-"


def hash_key(key: str) -> str:
    # a header value that was not UTF-8 reaches us with its bytes as lone surrogates
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str


class KeyStore:
    def __init__(self, redis: Any, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self.index = key_index_key(prefix)

    async def create(self, tenant: str) -> tuple[str, str]:
        """A new key for ``tenant``: returns (key id, key). The key is not kept."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        digest = hash_key(key)
        meta = {"id": key_id, "created_at_ms": int(time.time() * 1000), "hint": key[-4:]}
        await self.redis.hset(
            TenantKeys.of(self.prefix, tenant).api_keys, key_id, json.dumps(meta | {"hash": digest})
        )
        await self.redis.hset(self.index, digest, f"{tenant} {key_id}")
        return key_id, key

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        raw = await self.redis.hvals(TenantKeys.of(self.prefix, tenant).api_keys)
        keys = [json.loads(item) for item in raw]
        for key in keys:
            key.pop("hash", None)
        return sorted(keys, key=lambda k: k["created_at_ms"])

    async def revoke(self, tenant: str, key_id: str) -> bool:
        keys = TenantKeys.of(self.prefix, tenant)
        raw = await self.redis.hget(keys.api_keys, key_id)
        if raw is None:
            return False
        await self.redis.hdel(self.index, json.loads(raw)["hash"])
        await self.redis.hdel(keys.api_keys, key_id)
        return True

    async def revoke_all(self, tenant: str) -> None:
        keys = TenantKeys.of(self.prefix, tenant)
        for raw in await self.redis.hvals(keys.api_keys):
            await self.redis.hdel(self.index, json.loads(raw)["hash"])
        await self.redis.delete(keys.api_keys)

    async def authenticate(self, key: str) -> Principal | None:
        if not key:
            return None
        found = await self.redis.hget(self.index, hash_key(key))
        if found is None:
            return None
        tenant, _, key_id = str(found).partition(" ")
        return Principal(tenant, key_id)
