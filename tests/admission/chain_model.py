"""The reference model of a request's chain of scopes (budgeter/admission/admission.py):
the tenant's scope, then each ancestor's nearest first, each one reference_model.State.

A reservation is made scope by scope; when a scope refuses, those already reserved are
released (newest first, the tenant's last) and the rest are only checked (reserve.lua's
check-only item: the answer as if reserving, nothing changed but the waiting flag). The
answer is the first REJECT, else the latest DEFER; a refusal of an ancestor is named
``parent:<id>:<reason>``. Settling settles every scope the reservation was made in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from budgeter.domain.tree import ancestors
from tests.admission import reference_model as ref


@dataclass
class ChainModel:
    parents: dict[str, str | None]
    states: dict[str, ref.State]
    chains: dict[str, list[str]] = field(default_factory=dict)  # rid -> ancestors reserved

    def ancestors(self, tenant: str) -> list[str]:
        return ancestors(self.parents, tenant)

    def reserve(
        self,
        tenant: str,
        rid: str,
        inp: int,
        out: int,
        now: int,
        hold: int,
        model: str,
        sent: bool,
        prices: str | None,
    ) -> ref.ReserveResult:
        first = ref.reserve(self.states[tenant], rid, inp, out, now, hold, model, sent, prices)
        chain = self.ancestors(tenant)
        if first.decision == "REJECT" or not chain:
            return first
        refusal = None if first.decision == "ADMIT" else first
        reserved: list[str] = []
        for scope in chain:
            checking = refusal is not None
            saved = copy.deepcopy(self.states[scope]) if checking else None
            got = ref.reserve(self.states[scope], rid, inp, out, now, hold, model, sent, prices)
            if got.decision == "ADMIT":
                if saved is not None:
                    self.states[scope] = saved  # checked only: nothing changes
                else:
                    reserved.append(scope)
                continue
            named = got._replace(reason=f"parent:{scope}:{got.reason}")
            if refusal is None or got.decision == "REJECT" or got.until_ms > refusal.until_ms:
                refusal = named
            if got.decision == "REJECT":
                break
        if refusal is None:
            self.chains[rid] = reserved
            return first
        if first.decision == "ADMIT":
            for scope in reversed(reserved):
                ref.release(self.states[scope], rid, now)
            ref.release(self.states[tenant], rid, now)
        return refusal

    def settle(
        self, tenant: str, mode: str, rid: str, usage: tuple[int, int, int, int], now: int
    ) -> ref.SettleResult:
        """Settle in the tenant's scope (its answer), then in the chain's."""
        result = self._settle_one(tenant, mode, rid, usage, now)
        for scope in self.chains.pop(rid, self.ancestors(tenant)):
            self._settle_one(scope, mode, rid, usage, now)
        return result

    def _settle_one(
        self, scope: str, mode: str, rid: str, usage: tuple[int, int, int, int], now: int
    ) -> ref.SettleResult:
        state = self.states[scope]
        if mode == "usage":
            return ref.settle(state, rid, *usage, now)
        if mode == "full":
            return ref.charge_full(state, rid, now)
        return ref.release(state, rid, now)

    def mark_sent(self, tenant: str, rid: str) -> bool:
        for scope in self.chains.get(rid, []):
            ref.mark_sent(self.states[scope], rid)
        return ref.mark_sent(self.states[tenant], rid)
