"""A small reference model of hierarchical fair share (sched/pick.lua with lib/hfq.lua):
the organisation tree, each tenant's FIFO of queued jobs, and what a fair scheduler owes
each tenant, worked out from the tree alone (no virtual times).

Levels are named as in lib/hfq.lua: level ``node`` ('' the root) holds its children whose
subtree has queued work, weighted by their policy weight, and ``node`` itself, weight 1,
when it has queued work of its own. A tenant's path is its levels from the root down to
its own entry ``(tenant, tenant)``.

- :meth:`TreeModel.share`: the fraction of picks a backlogged tenant is owed, the product
  along its path of weight / sum of the weights of the level's backlogged members.
- :meth:`TreeModel.wait_bound`: at most how many picks may pass between two picks of a
  tenant that stays backlogged (or from when it became backlogged to its first pick), for
  jobs of equal cost. At one level, a member x served at virtual start s is next served at
  s + 1/w_x; every other member j present is at or above s (members enter at or above the
  level's clock and lowest time), so it is served at most w_j / w_x + 1 times meanwhile:
  the level serves at most g = W / w_x + n - 1 picks from one pick of x to the next (W, n:
  weight and count of the members backlogged at any time of the interval). Each pick of a
  node is one pick of its level above, so the whole tree makes at most the product of g
  along the path, and the wait (picks strictly between) is one less.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

ROOT = ""


@dataclass
class TreeModel:
    parent: dict[str, str | None]
    weight: dict[str, float]
    queued: dict[str, deque[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.parent:
            self.queued.setdefault(t, deque())

    # the tree ---------------------------------------------------------------------------

    def chain(self, tenant: str) -> list[str]:
        """The tenant's ancestors and itself, root first."""
        out = [tenant]
        while (up := self.parent[out[-1]]) is not None:
            out.append(up)
        return out[::-1]

    def path(self, tenant: str) -> list[tuple[str, str]]:
        """(level, member) from the root level down to the tenant's own entry."""
        chain = self.chain(tenant)
        levels = [(ROOT, chain[0])]
        levels += [(chain[i - 1], chain[i]) for i in range(1, len(chain))]
        return [*levels, (tenant, tenant)]

    def children(self, node: str) -> list[str]:
        return [t for t, p in self.parent.items() if (p or ROOT) == node]

    def subtree(self, node: str) -> set[str]:
        """Every tenant at or below ``node`` (every tenant for the root)."""
        return {t for t in self.parent if node == ROOT or node in self.chain(t)}

    def depth(self) -> int:
        return max(len(self.chain(t)) - 1 for t in self.parent)

    # backlog ----------------------------------------------------------------------------

    def backlogged(self) -> set[str]:
        return {t for t, q in self.queued.items() if q}

    def backlog(self) -> int:
        return sum(len(q) for q in self.queued.values())

    def members(self, node: str, active: set[str]) -> dict[str, float]:
        """The members of level ``node`` when the tenants ``active`` have queued work."""
        out = {c: self.weight[c] for c in self.children(node) if self.subtree(c) & active}
        if node != ROOT and node in active:
            out[node] = 1.0  # a parent's own work: one member of weight 1
        return out

    def share(self, tenant: str, active: set[str]) -> float:
        """The fraction of all picks owed to ``tenant`` while ``active`` are backlogged."""
        out = 1.0
        for node, member in self.path(tenant):
            level = self.members(node, active)
            out *= level[member] / sum(level.values())
        return out

    def wait_bound(self, tenant: str, seen: set[str]) -> int:
        """Most picks strictly between two picks of ``tenant`` (jobs of equal cost) while
        the tenants ``seen`` were backlogged at some time of the interval."""
        total = 1.0
        for node, member in self.path(tenant):
            level = self.members(node, seen | {tenant})
            total *= sum(level.values()) / level[member] + len(level) - 1
        return math.floor(total + 1e-9) - 1
