"""The reference model of a request's chain of scopes (budgeter/admission/admission.py):
the tenant's scope, then each ancestor's nearest first, each one reference_model.State.

A reservation is made scope by scope; when a scope refuses, those already reserved are
released (newest first, the tenant's last) and the rest are only checked (reserve.lua's
check-only item: the answer as if reserving, nothing changed but the waiting flag). The
answer is the first REJECT, else the latest DEFER; a refusal of an ancestor is named
``parent:<id>:<reason>``. Settling settles every scope the reservation was made in.

An API key with limits is one more scope (``<tenant>:k:<key>`` in ``states``), decided in
the tenant's own call (reserve.lua's KEYS[9..16]): checked after the tenant's unless the
tenant rejects or the key already holds the id; both must admit, else neither is
changed; the answer is the tenant's REJECT, else the key's (``key:<reason>``), else the
latest DEFER (the tenant's on a tie). Admission then remembers the key as the first scope
of the reservation's chain (rolled back, settled and marked sent with the others).
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
        key: str | None = None,
    ) -> ref.ReserveResult:
        """``key``: the scope name (``<tenant>:k:<id>``) of the API key's limits, if any."""
        first = self._reserve_own(tenant, key, rid, inp, out, now, hold, model, sent, prices)
        held = [key] if key is not None and first.decision == "ADMIT" else []
        if held:
            self.chains[rid] = list(held)
        chain = self.ancestors(tenant)
        if first.decision == "REJECT" or not chain:
            return first
        refusal = None if first.decision == "ADMIT" else first
        reserved: list[str] = list(held)
        next_ms = first.until_ms  # an ADMIT's: the latest next request of the chain
        for scope in chain:
            checking = refusal is not None
            saved = copy.deepcopy(self.states[scope]) if checking else None
            got = ref.reserve(self.states[scope], rid, inp, out, now, hold, model, sent, prices)
            if got.decision == "ADMIT":
                if saved is not None:
                    self.states[scope] = saved  # checked only: nothing changes
                else:
                    reserved.append(scope)
                    next_ms = max(next_ms, got.until_ms)
                continue
            named = got._replace(reason=f"parent:{scope}:{got.reason}")
            if refusal is None or got.decision == "REJECT" or got.until_ms > refusal.until_ms:
                refusal = named
            if got.decision == "REJECT":
                break
        if refusal is None:
            self.chains[rid] = reserved
            return first._replace(until_ms=next_ms)
        if first.decision == "ADMIT":
            for scope in reversed(reserved):
                ref.release(self.states[scope], rid, now)
            ref.release(self.states[tenant], rid, now)
        return refusal

    def _reserve_own(
        self,
        tenant: str,
        key: str | None,
        rid: str,
        inp: int,
        out: int,
        now: int,
        hold: int,
        model: str,
        sent: bool,
        prices: str | None,
    ) -> ref.ReserveResult:
        """The tenant's own call: its scope and, when given, its key's."""
        args = (rid, inp, out, now, hold, model, sent, prices)
        saved = copy.deepcopy(self.states[tenant])
        own = ref.reserve(self.states[tenant], *args)
        if key is None or own.decision == "REJECT" or own.reason == "already_reserved":
            return own
        saved_key = copy.deepcopy(self.states[key])
        got = ref.reserve(self.states[key], *args)
        answer = own
        if got.decision == "REJECT" or (
            got.decision == "DEFER" and (own.decision == "ADMIT" or got.until_ms > own.until_ms)
        ):
            answer = got._replace(reason=f"key:{got.reason}")
        if answer.decision != "ADMIT":  # both admit, or neither is changed (but the flags)
            if own.decision == "ADMIT":
                self.states[tenant] = saved
            if got.decision == "ADMIT":
                self.states[key] = saved_key
        return answer

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
