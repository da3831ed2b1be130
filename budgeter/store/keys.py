"""Redis key names. Everything about one tenant carries the hash tag ``{t:<tenant>}``;
the scheduler's global sets live under ``{sched}``; every key that belongs to no tenant
has a deliberate tag of its own (``{sched}``, ``{idx}``, ``{g:<model>}``, ``{ct:<digest>}``,
...); nothing global is ever touched in the same script as a tenant's keys, so every
script is correct on Redis Cluster."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from budgeter.domain.policy import check_tenant_id


class AdmissionKeys:
    """The keys of one admission scope, shared by reserve.lua and settle.lua: a tenant's
    (TenantKeys) or one model's of the upstream account (GlobalModelKeys). Subclasses say
    where they live with ``_k``."""

    __slots__ = ()

    def _k(self, name: str) -> str:
        raise NotImplementedError

    @property
    def buckets(self) -> str:
        """hash: [m:<model>:]rpm|itpm|otpm -> theoretical arrival time (ms) of a GCRA bucket."""
        return self._k("buckets")

    @property
    def budget(self) -> str:
        """hash: <counter>:id, <counter>:used, <counter>:reserved, where a counter is
        [m:<model>:][usd:]<period> (usd counters in US dollars)."""
        return self._k("budget")

    @property
    def resv(self) -> str:
        """hash: reservation id -> reservation JSON."""
        return self._k("resv")

    @property
    def resv_deadline(self) -> str:
        """zset: reservation id -> deadline (ms) after which the reaper acts."""
        return self._k("resv_deadline")

    @property
    def resv_sent(self) -> str:
        """hash: reservation id -> 1 once the upstream call may have started."""
        return self._k("resv_sent")

    @property
    def usage(self) -> str:
        """hash: <period>:<period id>:<model>:<kind> -> tokens settled."""
        return self._k("usage")

    @property
    def recent(self) -> str:
        """list: the last 20 admission decisions, newest first."""
        return self._k("recent")

    @property
    def state(self) -> str:
        """hash: flags: waiting_settle; paused_until (ms): DEFER everything until then."""
        return self._k("state")

    @property
    def outbox(self) -> str:
        """stream: the scope's notification events (admission/settle.lua appends budget
        crossings, queue/ack.lua and batch/cancel.lua batch ends and dead letters), fields
        ``type`` and ``data`` (budgeter.notify.events), consumer group ``delivery``
        (budgeter.notify.outbox); never written for an account scope."""
        return self._k("outbox")


@dataclass(frozen=True, slots=True)
class KeyScopeKeys(AdmissionKeys):
    """The admission scope of one API key's limits: under its tenant's hash tag, so in the
    tenant's slot. ``policy`` holds the key's flat limits (an empty hash: none)."""

    prefix: str
    tenant: str
    key_id: str

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{{t:{self.tenant}}}:k:{self.key_id}:{name}"

    @property
    def policy(self) -> str:
        """hash: the key's limits, flattened as a policy's (TenantPolicy.redis_fields)."""
        return self._k("policy")


@dataclass(frozen=True, slots=True)
class TenantKeys(AdmissionKeys):
    prefix: str
    tenant: str

    @classmethod
    def of(cls, prefix: str, tenant: str) -> TenantKeys:
        return cls(prefix, check_tenant_id(tenant))

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{{t:{self.tenant}}}:{name}"

    @property
    def policy(self) -> str:
        """hash: flattened policy (see TenantPolicy.redis_fields)."""
        return self._k("policy")

    @property
    def limited_keys(self) -> str:
        """set: ids of the tenant's API keys that have limits (their scopes are reaped with
        the tenant's)."""
        return self._k("limited_keys")

    @property
    def ledger(self) -> str:
        """stream: one entry per settled reservation of the tenant (admission/settle.lua's
        KEYS[9], written in the same call as the counters)."""
        return self._k("ledger")

    @property
    def minutes(self) -> str:
        """hash: per-minute usage rollups for 48 h, '<minute>:<kind>' -> tokens (usd: dollars)
        and 'trimmed' (admission/settle.lua's KEYS[10]; format in budgeter.tenants.rollups)."""
        return self._k("minutes")

    @property
    def queue(self) -> str:
        """list: job ids waiting at priority 'normal', FIFO (RPUSH to enqueue, LPOP to take)."""
        return self._k("queue")

    @property
    def queue_high(self) -> str:
        """list: job ids waiting at priority 'high' (taken before 'normal')."""
        return self._k("queue:high")

    @property
    def queue_low(self) -> str:
        """list: job ids waiting at priority 'low' (taken after 'normal')."""
        return self._k("queue:low")

    @property
    def queues(self) -> tuple[str, str, str]:
        """The tenant's queues in the order they are served: high, normal, low."""
        return (self.queue_high, self.queue, self.queue_low)

    def queue_for(self, priority: str) -> str:
        return {"high": self.queue_high, "low": self.queue_low}.get(priority, self.queue)

    @property
    def leases(self) -> str:
        """zset: job id -> lease expiry (ms, Redis server time)."""
        return self._k("leases")

    @property
    def jobs(self) -> str:
        """hash: job id -> the job's ``params`` JSON as the client sent it (immutable after
        submit; a job id is '<batch id>:<custom_id>', so batch and custom id are not
        repeated in the value)."""
        return self._k("jobs")

    @property
    def jstate(self) -> str:
        """hash: job id -> queued | leased | succeeded | errored | canceled | expired. A job
        in ``jobs`` without an entry here is queued (submit writes no state: one hash entry
        less per waiting job)."""
        return self._k("jstate")

    @property
    def bmeta(self) -> str:
        """hash: batch id -> '<enqueued ms> <deadline ms> [priority]' (Redis server time;
        priority high | normal | low, absent = normal): what every job of the batch shares,
        stored once per batch."""
        return self._k("bmeta")

    @property
    def attempts(self) -> str:
        """hash: job id -> attempts so far."""
        return self._k("attempts")

    @property
    def results(self) -> str:
        """hash: job id -> result JSON (Message Batches result shape)."""
        return self._k("results")

    @property
    def dead(self) -> str:
        """list: dead-lettered job ids."""
        return self._k("dead")

    @property
    def outcomes(self) -> str:
        """hash: submitted | succeeded | errored | canceled | expired -> jobs, cumulative.
        Incremented in the same MULTI/script as the transition it counts (submit, queue/ack.lua,
        batch/cancel.lua); never decremented (deleting a batch or the tenant keeps it)."""
        return self._k("outcomes")

    @property
    def api_keys(self) -> str:
        """hash: key id -> {"id", "created_at_ms", "hint", "hash"} (never the key)."""
        return self._k("api_keys")

    @property
    def api_keys_used(self) -> str:
        """hash: key id -> when the key was last used (ms; written at most once a minute
        per key and API process)."""
        return self._k("api_keys_used")

    @property
    def batches(self) -> str:
        """zset: batch id -> created_at (ms)."""
        return self._k("batches")

    @property
    def canceled_batches(self) -> str:
        """set: batch ids being canceled (their jobs are not served any more)."""
        return self._k("canceled_batches")

    def batch(self, batch_id: str) -> str:
        """hash: batch meta and request counts; ``betas`` and ``anthropic_version`` when the
        batch was created with them (what its jobs send upstream, ``BatchStore.passthrough``)."""
        return self._k(f"batch:{batch_id}")

    def batch_jobs(self, batch_id: str) -> str:
        """list: the batch's custom ids in submission order, packed: each element is a JSON
        array of up to 1,000 custom ids (one element per submitted chunk; a job id is
        '<batch id>:<custom_id>')."""
        return self._k(f"batch:{batch_id}:cids")


@dataclass(frozen=True, slots=True)
class SchedKeys:
    prefix: str

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{{sched}}:{name}"

    @property
    def ready(self) -> str:
        """zset: backlogged tenant -> virtual time (weighted fair queueing)."""
        return self._k("ready")

    @property
    def parked(self) -> str:
        """zset: deferred tenant -> ms (server time) when its DEFER ends."""
        return self._k("parked")

    @property
    def vtime(self) -> str:
        """hash: tenant -> its last virtual time, kept while it is idle."""
        return self._k("vtime")

    @property
    def weight(self) -> str:
        """hash: tenant -> scheduling weight (copied from the policy)."""
        return self._k("weight")

    @property
    def cost(self) -> str:
        """hash: tenant -> its jobs' mean size in thousands of tokens (a moving average fed
        by the workers): what one of its jobs advances its virtual time by, times 1/weight."""
        return self._k("cost")

    @property
    def probe(self) -> str:
        """hash: tenant that came due off a park -> its probes in a row not deferred; it is
        leased one job at a time until its next decision (sched/pick.lua)."""
        return self._k("probe")

    @property
    def held(self) -> str:
        """zset: probing tenant with its probe lease out -> ms the hold ends at the latest."""
        return self._k("held")

    @property
    def parent(self) -> str:
        """hash: tenant -> its parent, for tenants that have one (the scheduler's copy of
        the organisation tree; empty: flat weighted fair queueing, see lib/hfq.lua)."""
        return self._k("parent")

    @property
    def hfq(self) -> str:
        """Base of the hierarchical fair queueing keys (lib/hfq.lua): '<hfq>:<node>' zsets
        (node '' the root) and the '<hfq>|v' hash of their virtual times."""
        return self._k("hfq")

    @property
    def activate_keys(self) -> list[str]:
        """KEYS of sched/activate.lua."""
        return [self.ready, self.parked, self.vtime, self.held, self.parent, self.hfq]

    @property
    def pick_keys(self) -> list[str]:
        """KEYS of sched/pick.lua."""
        s = self
        return [s.ready, s.parked, s.vtime, s.weight, s.cost, s.probe, s.held, s.parent, s.hfq]

    @property
    def wake(self) -> str:
        """list: tenant names pushed by producers; idle workers block on it."""
        return self._k("wake")

    @property
    def tenants(self) -> str:
        """set: every tenant with a policy."""
        return self._k("tenants")

    @property
    def known(self) -> str:
        """set: every tenant that ever had a policy (maintenance still reclaims and reaps
        the leases and reservations of a deleted tenant)."""
        return self._k("known")


def batch_index_key(prefix: str) -> str:
    """hash: batch id -> tenant (its own slot)."""
    return f"{prefix}:{{idx}}:batches"


def key_index_key(prefix: str) -> str:
    """hash: SHA-256 of a tenant API key -> '<tenant> <key id>' (its own slot)."""
    return f"{prefix}:{{keys}}:by_hash"


def auth_failures_key(prefix: str, client: str) -> str:
    """string: failed authentications of one client address in the current window."""
    return f"{prefix}:{{auth}}:failures:{client}"


def tree_parents_key(prefix: str) -> str:
    """hash: tenant -> its parent tenant ('' for a root), every tenant with a policy
    (budgeter.domain.tree; one slot, so a change is one compare-and-set)."""
    return f"{prefix}:{{tree}}:parents"


def tree_version_key(prefix: str) -> str:
    """string: incremented by every change of the tree (tenants/tree_set.lua)."""
    return f"{prefix}:{{tree}}:version"


def notify_pending_key(prefix: str) -> str:
    """set: tenants whose outbox may hold events not delivered yet (a hint)."""
    return f"{prefix}:{{notify}}:pending"


def audit_log_key(prefix: str) -> str:
    """stream: the admin writes (budgeter.tenants.audit), trimmed by age and count."""
    return f"{prefix}:{{audit}}:log"


@dataclass(frozen=True, slots=True)
class GlobalModelKeys(AdmissionKeys):
    """The upstream account's limits of one model: a scope of its own, ``{g:<digest>}``
    (the model's name is hashed, so no name can reach into another key or slot). The
    same names as a tenant's admission keys, so reserve.lua and settle.lua serve both;
    ``usage`` is the account's usage of the model, ``state`` holds ``paused_until`` (ms)
    after an upstream 429."""

    prefix: str
    model: str

    def _k(self, name: str) -> str:
        digest = hashlib.sha256(self.model.encode()).hexdigest()[:16]
        return f"{self.prefix}:{{g:{digest}}}:{name}"

    @property
    def policy(self) -> str:
        """unused (admission/reserve.lua gets the global policy as an argument); names the slot."""
        return self._k("policy")


def global_models_key(prefix: str) -> str:
    """set: models with a global scope in use (the reaper walks them)."""
    return f"{prefix}:{{global}}:models"


def global_pauses_key(prefix: str) -> str:
    """hash: model -> paused until (ms, Redis time) after an upstream 429."""
    return f"{prefix}:{{global}}:pauses"


def global_policy_key(prefix: str) -> str:
    """string: the upstream account's policy JSON (its own slot)."""
    return f"{prefix}:{{global}}:policy"


def count_cache_key(prefix: str, digest: str) -> str:
    """string: cached count_tokens answer for a payload digest. Its hash tag is the digest
    itself, ``{ct:<digest>}``, on purpose: the cache belongs to no tenant, and a tag per
    payload spreads it over every master of a cluster (a fixed ``{ct}`` would put all
    of it, and all its traffic, on one node, whose failure would then cost every hit)."""
    return f"{prefix}:{{ct:{digest}}}"
