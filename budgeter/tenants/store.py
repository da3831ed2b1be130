"""Tenant policies in Redis: put, patch (a JSON merge patch), get, list_ids, delete.

The policy hash is this store's: other modules ask :meth:`TenantStore.get` for the parsed
policy instead of reading its fields (``admission/reserve.lua`` reads the flat limits)."""

from __future__ import annotations

from collections.abc import Callable

from redis.typing import EncodableT, FieldT

from budgeter.domain import policy_fields
from budgeter.domain.messages import JsonValue
from budgeter.domain.policy import TenantPolicy, check_tenant_id
from budgeter.domain.tree import HasChildrenError, check_parent, children
from budgeter.store.keys import SchedKeys, TenantKeys, tree_parents_key, tree_version_key
from budgeter.store.scripts import register
from budgeter.store.types import RedisClient
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.merge_patch import patched_policy

PATCH_ATTEMPTS = 50  # read-merge-write rounds before a patch gives up on concurrent writers
TREE_ATTEMPTS = 50  # read-check-write rounds of the organisation tree


class PolicyConflictError(RuntimeError):
    """The policy kept changing under a patch (another writer each time)."""


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sorted_texts(members: set[bytes | str]) -> list[str]:
    """A set's members (str: the client decodes responses), sorted."""
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)


class TenantStore:
    def __init__(self, redis: RedisClient, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self.sched = SchedKeys(prefix)
        self._replace = register(redis, "tenants/replace_policy.lua")
        self._tree_set = register(redis, "tenants/tree_set.lua")
        self._tree_keys = [tree_parents_key(prefix), tree_version_key(prefix)]

    async def put(self, tenant: str, policy: TenantPolicy) -> None:
        """Create or replace a tenant's policy (the flat hash admission/reserve.lua reads).
        Its ``parent`` is checked against the tree first
        (:class:`~budgeter.domain.tree.TreeError`: nothing stored)."""
        await self._set_parent(tenant, policy.parent)
        keys = TenantKeys.of(self.prefix, tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.policy)
            fields: dict[FieldT, EncodableT] = dict(policy.redis_fields().items())
            pipe.hset(keys.policy, mapping=fields)
            await pipe.execute()
        await self._schedule(tenant, policy)

    async def patch(self, tenant: str, patch: JsonValue) -> TenantPolicy | None:
        """Merge ``patch`` (RFC 7396) into the tenant's stored policy and store the result,
        validated whole (:class:`~budgeter.tenants.merge_patch.InvalidPolicyError`:
        nothing stored). None when the tenant has no policy. A concurrent change of the
        policy is never lost: the write is a compare-and-set, retried on the new policy."""
        both = await self.patch_with_before(tenant, patch)
        return None if both is None else both[1]

    async def patch_with_before(
        self, tenant: str, patch: JsonValue
    ) -> tuple[TenantPolicy, TenantPolicy] | None:
        """:meth:`patch`, answering the policy it replaced too (for the audit log)."""
        key = TenantKeys.of(self.prefix, tenant).policy
        for _ in range(PATCH_ATTEMPTS):
            raw = await self.redis.hget(key, policy_fields.JSON)
            if raw is None:
                return None
            before = TenantPolicy.model_validate_json(raw)
            policy = patched_policy(before, patch)
            if policy.parent != before.parent:
                await self._set_parent(tenant, policy.parent)
            flat = [part for pair in policy.redis_fields().items() for part in pair]
            replaced = int(await self._replace(keys=[key], args=[raw, *flat]))
            if replaced == 1:
                await self._schedule(tenant, policy)
                return before, policy
            if replaced == -1:
                return None
        raise PolicyConflictError(f"tenant {tenant!r}: the policy kept changing; try again")

    async def tree(self) -> tuple[str, dict[str, str | None]]:
        """(version, tenant -> parent or None) of the organisation tree."""
        parents_key, version_key = self._tree_keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(version_key)
            pipe.hgetall(parents_key)
            version, raw = await pipe.execute()
        parents = {_str(t): (_str(p) or None) for t, p in (raw or {}).items()}
        return ("" if version is None else _str(version)), parents

    async def parents(self) -> dict[str, str | None]:
        """tenant -> parent (None for a root) of every tenant in the tree."""
        return (await self.tree())[1]

    async def _change_tree(self, build: Callable[[dict[str, str | None]], list[str]]) -> None:
        """Read the tree, let ``build`` check it and answer the ops of tenants/tree_set.lua,
        and write them if the tree did not change meanwhile (else again)."""
        for _ in range(TREE_ATTEMPTS):
            version, parents = await self.tree()
            ops = build(parents)
            if int(await self._tree_set(keys=self._tree_keys, args=[version, *ops])) == 1:
                return
        raise PolicyConflictError("the organisation tree kept changing; try again")

    async def _set_parent(self, tenant: str, parent: str | None) -> None:
        if parent is None:
            # a root is valid in any tree: written without reading the tree, so that
            # creating many tenants at once costs one call each, not a read of the whole
            # tree and a retry for every concurrent writer
            await self._tree_set(keys=self._tree_keys, args=["*", "set", tenant, ""])
            return
        # a parent made by a version without the tree has a policy but no entry yet
        older = await self.exists(parent)

        def build(parents: dict[str, str | None]) -> list[str]:
            ops = []
            if parent is not None and parent not in parents and older:
                parents[parent] = None
                ops += ["set", parent, ""]
            check_parent(parents, tenant, parent)
            return [*ops, "set", tenant, parent or ""]

        await self._change_tree(build)

    async def _schedule(self, tenant: str, policy: TenantPolicy) -> None:
        """The scheduler's copy of the weight and the tenant sets (their own slot)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.sched.weight, tenant, repr(float(policy.weight)))
            if policy.parent is None:
                pipe.hdel(self.sched.parent, tenant)
            else:  # the scheduler's copy of the tree (lib/hfq.lua): future picks only
                pipe.hset(self.sched.parent, tenant, policy.parent)
            pipe.sadd(self.sched.tenants, tenant)
            pipe.sadd(self.sched.known, tenant)
            await pipe.execute()

    async def get(self, tenant: str) -> TenantPolicy | None:
        """The tenant's policy, parsed; None when it has none."""
        key = TenantKeys.of(self.prefix, tenant).policy
        raw = await self.redis.hget(key, policy_fields.JSON)
        return None if raw is None else TenantPolicy.model_validate_json(raw)

    async def exists(self, tenant: str) -> bool:
        return bool(await self.redis.exists(TenantKeys.of(self.prefix, tenant).policy))

    async def list_ids(self) -> list[str]:
        """The tenants that have a policy, sorted."""
        return _sorted_texts(await self.redis.smembers(self.sched.tenants))

    async def known(self) -> list[str]:
        """Tenants with a policy and deleted ones: maintenance looks after both."""
        return _sorted_texts(await self.redis.smembers(self.sched.known))

    async def delete(self, tenant: str) -> bool:
        """Remove the policy and revoke the tenant's API keys (a tenant created again later
        never inherits them); queued work of the tenant is refused from then on. A tenant
        with children is refused (:class:`~budgeter.domain.tree.HasChildrenError`)."""
        check_tenant_id(tenant)

        def build(parents: dict[str, str | None]) -> list[str]:
            below = children(parents, tenant)
            if below:
                raise HasChildrenError(tenant, below)
            return ["del", tenant, ""]

        await self._change_tree(build)
        removed = await self.redis.delete(TenantKeys.of(self.prefix, tenant).policy)
        await KeyStore(self.redis, prefix=self.prefix).revoke_all(tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(self.sched.tenants, tenant)
            pipe.hdel(self.sched.weight, tenant)
            pipe.hdel(self.sched.parent, tenant)
            pipe.hdel(self.sched.cost, tenant)
            await pipe.execute()
        return bool(removed)
