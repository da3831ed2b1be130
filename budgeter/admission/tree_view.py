"""This process's view of the organisation tree, for admission: a tenant's ancestors.

Admission reserves a request in its tenant's scope and then in every ancestor's
(budgeter/admission/admission.py). The tree lives in one hash on ``{tree}``
(budgeter/tenants/store.py); reading it for every request would cost a round trip, so
this view reads the tree's version at most once per ``refresh_s`` and the whole tree only
when the version moved. A re-parenting therefore moves the charges of requests reserved
from at most ``refresh_s`` later on; reservations already made settle along the chain
they were made with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from budgeter.domain.tree import Parents, ancestors
from budgeter.store.keys import tree_parents_key, tree_version_key
from budgeter.store.types import RedisClient


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TreeView:
    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "budgeter",
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self.clock = clock
        self._parents_key = tree_parents_key(prefix)
        self._version_key = tree_version_key(prefix)
        self._checked_at: float | None = None
        self._version: str | None = None
        self._parents: dict[str, str | None] = {}
        self._ancestors: dict[str, tuple[str, ...]] = {}
        self._loading: asyncio.Future[None] | None = None  # the one read in flight

    async def ancestors(self, tenant: str) -> tuple[str, ...]:
        """The parent, grandparent, ... of ``tenant``, nearest first (() for a root)."""
        await self._refresh()
        found = self._ancestors.get(tenant)
        if found is None:
            found = self._ancestors[tenant] = tuple(ancestors(self._parents, tenant))
        return found

    async def parents(self) -> Parents:
        """tenant -> parent of every tenant in the tree, as of the last refresh."""
        await self._refresh()
        return self._parents

    async def _refresh(self) -> None:
        now = self.clock()
        if self._checked_at is not None and now - self._checked_at < self.refresh_s:
            return
        # one read for every caller that finds the view stale: they all wait on the same
        # future, so they go on in the same event-loop round (and their reserves still
        # share one script call)
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        raw_version = await self.redis.get(self._version_key)
        version = "" if raw_version is None else _text(raw_version)
        if version != self._version:
            raw = await self.redis.hgetall(self._parents_key)
            self._parents = {_text(t): (_text(p) or None) for t, p in raw.items()}
            self._ancestors = {}
            self._version = version
        self._checked_at = self.clock()
