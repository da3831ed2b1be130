"""Probe leases (issue 20): a tenant that comes due off a park is leased one job at a time
until that job's admission decision (sched/pick.lua, sched/probe_end.lua), so a tenant
released by its bucket gets as many leases as the bucket admits, plus at most one."""

from __future__ import annotations

from collections.abc import Sequence

from budgeter.store.keys import SchedKeys
from budgeter.store.scripts import register
from budgeter.store.types import RedisClient

PROBE_RAMP = 8  # probes in a row not deferred, after which the tenant is served at full speed


def wanted_from(picks: Sequence[str]) -> tuple[dict[str, int], set[str]]:
    """(tenant -> picks, probing tenants) of sched/pick.lua's tenants ('?<t>': a probe)."""
    wanted: dict[str, int] = {}
    probes: set[str] = set()
    for name in picks:
        tenant = name[1:] if name.startswith("?") else name
        if tenant != name:
            probes.add(tenant)
        wanted[tenant] = wanted.get(tenant, 0) + 1
    return wanted, probes


class ProbeEnd:
    def __init__(self, redis: RedisClient, sched: SchedKeys) -> None:
        self.redis = redis
        self.sched = sched
        self._script = register(redis, "sched/probe_end.lua")

    async def __call__(self, tenant: str, *, decided: bool = True) -> bool:
        """End the tenant's probe hold; wakes one idle worker when it did."""
        s = self.sched
        done = await self._script(
            keys=[s.ready, s.vtime, s.probe, s.held, s.parent, s.hfq],
            args=[tenant, PROBE_RAMP, "1" if decided else "0"],
        )
        if int(done):
            await self.redis.rpush(s.wake, tenant)
        return bool(int(done))
