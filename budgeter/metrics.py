"""Prometheus metrics of the catalogue in shared/DESIGN.md, with bounded labels."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from budgeter.admission.reasons import metric_reason
from budgeter.domain.jobs import TERMINAL_STATES
from budgeter.domain.periods import PERIODS
from budgeter.domain.policy_fields import RATE_KINDS
from budgeter.queue.jobqueue import oldest_queued_age_s
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.store.server_time import server_time_ms
from budgeter.store.types import RedisClient

OTHER = "other"
TERMINAL_OUTCOMES = TERMINAL_STATES
REAP_ACTIONS = ("charged", "released")
TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")
COUNT_CACHE_RESULTS = ("hit", "miss", "error")  # error: a failed read or write
# the (decision, reason) series every known tenant exports from the start: the reasons are
# open-ended per policy (periods, models, the account's limits), so these are the ones
# without a model that a tenant's own policy can give; any other appears at its first use
INITIAL_DECISIONS: tuple[tuple[str, str], ...] = (
    ("ADMIT", "none"),
    *(("DEFER", f"rate:{kind}") for kind in RATE_KINDS),
    ("DEFER", "concurrency"),
    *(("REJECT", f"exhausted:{period}") for period in PERIODS),
)


class BoundedLabel:
    """Keeps at most ``limit`` distinct values of a label; the rest become ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class DurableJobCounts:
    """The job counters kept in Redis (``TenantKeys.outcomes``), exported as counters.

    They survive the processes that made them (a SIGKILLed worker's own
    ``budgeter_jobs_total`` vanishes with it): submit and every terminal transition
    increment them atomically with the transition. The API process reads them at scrape
    time (:func:`refresh_state_metrics`); other processes export no samples.
    """

    def __init__(self) -> None:
        self.submitted: dict[str, float] = {}
        self.terminal: dict[tuple[str, str], float] = {}

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        submitted = CounterMetricFamily(
            "budgeter_jobs_submitted_durable",
            "Jobs ever submitted, counted in Redis (cumulative; read by the API process).",
            labels=["tenant"],
        )
        terminal = CounterMetricFamily(
            "budgeter_jobs_terminal_durable",
            "Jobs that reached a terminal state, by outcome, counted in Redis atomically "
            "with the transition (cumulative; read by the API process).",
            labels=["tenant", "outcome"],
        )
        return submitted, terminal

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        submitted, terminal = self._families()
        for label, value in sorted(self.submitted.items()):
            submitted.add_metric([label], value)
        for (label, outcome), value in sorted(self.terminal.items()):
            terminal.add_metric([label, outcome], value)
        yield submitted
        yield terminal


def reason_label(reason: str) -> str:
    """Admission reasons are a bounded vocabulary ('rate:itpm', 'exhausted:day'); an
    ancestor's id is dropped ('parent:exhausted:day')."""
    return metric_reason(reason) if reason else "none"


class TenantSeries:
    """The children of one ``tenant`` label value, created together at 0 when the process
    first learns the tenant, so that Prometheus' ``rate()``/``increase()`` see the first
    increment; kept by :meth:`Metrics.for_tenant`, so the hot path calls no ``labels()``."""

    def __init__(self, metrics: Metrics, label: str) -> None:
        self.label = label
        self._metrics = metrics
        self.jobs: dict[str, Counter] = {
            o: metrics.jobs.labels(label, o) for o in TERMINAL_OUTCOMES
        }
        self._decisions = {key: metrics.decisions.labels(label, *key) for key in INITIAL_DECISIONS}
        self.reaped = {a: metrics.reaped.labels(label, a) for a in REAP_ACTIONS}
        self.dead_lettered = metrics.dead_lettered.labels(label)
        self.count_estimated = metrics.count_estimated.labels(label)
        self.admission_wait = metrics.admission_wait.labels(label)
        self._tokens: dict[str, dict[str, Counter]] = {}  # model label -> kind -> child

    def job(self, outcome: str) -> Counter:
        child = self.jobs.get(outcome)
        if child is None:
            child = self.jobs[outcome] = self._metrics.jobs.labels(self.label, outcome)
        return child

    def decision(self, kind: str, reason: str) -> Counter:
        """The child of one decision; reasons are a bounded vocabulary (the dict too)."""
        key = (kind, reason_label(reason))
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self._metrics.decisions.labels(self.label, *key)
        return child

    def tokens(self, model: str) -> dict[str, Counter]:
        """Every kind of token of one model at once (the model label is bounded too)."""
        mlabel = self._metrics.model(model)
        kinds = self._tokens.get(mlabel)
        if kinds is None:
            family = self._metrics.tokens
            kinds = self._tokens[mlabel] = {
                k: family.labels(self.label, mlabel, k) for k in TOKEN_KINDS
            }
        return kinds


class Metrics:
    """Every metric of one process, in its own registry (tests make as many as they like)."""

    def __init__(self, *, max_tenants: int = 50, max_models: int = 20) -> None:
        self.registry = CollectorRegistry()
        self.tenant = BoundedLabel(max_tenants)
        self.model = BoundedLabel(max_models)
        r = self.registry
        self.jobs = Counter(
            "budgeter_jobs_total",
            "Jobs that reached a terminal state, by outcome.",
            ["tenant", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "budgeter_admission_decisions_total",
            "Admission decisions (ADMIT, DEFER, REJECT) and the limit that decided.",
            ["tenant", "decision", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "budgeter_tokens_total",
            "Tokens the upstream reported as used, by kind.",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "budgeter_budget_remaining_tokens",
            "Tokens left in the current period of each budget (limit - used - reserved).",
            ["tenant", "period"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "budgeter_queue_depth", "Jobs waiting in the tenant's queue.", ["tenant"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "budgeter_queue_oldest_age_seconds",
            "Age of the job at the head of the tenant's queue.",
            ["tenant"],
            registry=r,
        )
        self.inflight = Gauge(
            "budgeter_inflight_requests",
            "Reservations held for requests in flight (read from Redis by the API process).",
            ["tenant"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "budgeter_upstream_request_duration_seconds",
            "Duration of each HTTP attempt to the upstream.",
            ["route", "status"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.admission_wait = Histogram(
            "budgeter_admission_wait_seconds",
            "Time from enqueue to admission.",
            ["tenant"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
            registry=r,
        )
        self.estimate_error = Histogram(
            "budgeter_estimate_error_ratio",
            "Actual tokens / reserved tokens of each settled reservation.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 1.01, 1.05, 1.1, 1.5, 2),
            registry=r,
        )
        self.reaped = Counter(
            "budgeter_reaped_reservations_total",
            "Reservations of dead workers settled by the reaper (charged in full or released).",
            ["tenant", "action"],
            registry=r,
        )
        self.count_cache = Counter(
            "budgeter_count_tokens_cache_total",
            "count_tokens lookups, by cache result.",
            ["result"],
            registry=r,
        )
        self.count_estimated = Counter(
            "budgeter_count_tokens_estimated_total",
            "Requests admitted on a local token estimate because count_tokens kept failing "
            "(policy on_count_failure=estimate).",
            ["tenant"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "budgeter_dead_lettered_total",
            "Jobs dead-lettered after their last attempt.",
            ["tenant"],
            registry=r,
        )
        self.webhook_events = Counter(
            "budgeter_webhook_events_total",
            "Notification events sent to BUDGETER_WEBHOOK_URL: delivered, retried (an "
            "attempt after a failed one), failed (given up after 24 h).",
            ["result"],
            registry=r,
        )
        for result in ("delivered", "retried", "failed"):
            self.webhook_events.labels(result)
        self.count_cache_results = {r: self.count_cache.labels(r) for r in COUNT_CACHE_RESULTS}
        self.durable = DurableJobCounts()
        r.register(self.durable)
        # tenant label -> its children: at most max_tenants + 1 ("other") entries
        self._series: dict[str, TenantSeries] = {}

    def for_tenant(self, tenant: str) -> TenantSeries:
        """The tenant's series (its label may be ``other``), created at 0 the first time."""
        series = self._series.get(tenant)
        if series is None:
            label = self.tenant(tenant)
            series = self._series.get(label)
            if series is None:
                series = self._series[label] = TenantSeries(self, label)
        return series

    def know_tenants(self, tenants: Iterable[str]) -> None:
        """Export every tenant-labelled counter of these tenants (at 0 if new)."""
        for tenant in tenants:
            self.for_tenant(tenant)

    def observe_upstream(self, route: str, status: str, seconds: float) -> None:
        self.upstream_duration.labels(route, status).observe(seconds)

    def record_settled(
        self,
        tenant: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cache_creation: int,
        cache_read: int,
        reserved: int,
    ) -> None:
        """Tokens the upstream reported for one settled reservation, and actual/reserved."""
        actual = input_tokens + output_tokens + cache_creation + cache_read
        if reserved:
            self.estimate_error.observe(actual / reserved)
        kinds = self.for_tenant(tenant).tokens(model)
        for kind, n in (
            ("input", input_tokens),
            ("output", output_tokens),
            ("cache_creation", cache_creation),
            ("cache_read", cache_read),
        ):
            if n:
                kinds[kind].inc(n)


async def refresh_state_metrics(
    redis: RedisClient, metrics: Metrics, tenants: list[str], *, prefix: str = "budgeter"
) -> None:
    """Read the values that live in Redis (queue depth, age, inflight, budget remaining,
    the durable job counters).

    Called by the API process's /metrics handler at scrape time; with several API replicas,
    dashboards aggregate these gauges with max(), never sum(). Tenants past the label cap
    are summed into ``other`` (oldest age: the max); series of deleted tenants or removed
    budgets disappear; a period that rolled over counts from zero (Redis server time).
    The durable job counters cover every tenant that ever had a policy, deleted ones too
    (their queued jobs still end; the counters never go down).
    """
    from budgeter.tenants.usage import tenant_usage  # usage imports nothing of metrics

    now_ms = await server_time_ms(redis)
    depth: dict[str, float] = {}
    inflight: dict[str, float] = {}
    age: dict[str, float] = {}
    remaining: dict[tuple[str, str], float] = {}
    for tenant in tenants:
        report = await tenant_usage(redis, tenant, prefix=prefix, now_ms=now_ms)
        if report is None:
            continue
        label = metrics.tenant(tenant)
        depth[label] = depth.get(label, 0) + report.queued
        inflight[label] = inflight.get(label, 0) + report.inflight
        oldest = await oldest_queued_age_s(redis, TenantKeys.of(prefix, tenant), now_ms)
        age[label] = max(age.get(label, 0.0), oldest)
        for row in report.budgets:
            if row.unit != "tokens" or row.model is not None:
                continue  # the gauge is the tenant's own token budgets
            key = (label, row.period)
            remaining[key] = remaining.get(key, 0) + row.remaining
    for gauge, values in (
        (metrics.queue_depth, depth),
        (metrics.inflight, inflight),
        (metrics.queue_oldest_age, age),
    ):
        gauge.clear()
        for label, value in values.items():
            gauge.labels(label).set(value)
    metrics.budget_remaining.clear()
    for (label, period), value in remaining.items():
        metrics.budget_remaining.labels(label, period).set(value)
    await _refresh_durable(redis, metrics, tenants, prefix=prefix)


async def _refresh_durable(
    redis: RedisClient, metrics: Metrics, tenants: list[str], *, prefix: str
) -> None:
    members = await redis.smembers(SchedKeys(prefix).known)  # str: decode_responses
    known = sorted(set(tenants) | {str(member) for member in members})
    metrics.know_tenants(known)
    async with redis.pipeline(transaction=False) as pipe:
        for tenant in known:
            pipe.hgetall(TenantKeys.of(prefix, tenant).outcomes)
        counts = await pipe.execute()
    submitted: dict[str, float] = {}
    terminal: dict[tuple[str, str], float] = {}
    for tenant, raw in zip(known, counts, strict=True):
        label = metrics.tenant(tenant)  # no hash yet (no job): exported at 0
        submitted[label] = submitted.get(label, 0) + int(raw.get("submitted", 0))
        for outcome in TERMINAL_OUTCOMES:
            key = (label, outcome)
            terminal[key] = terminal.get(key, 0) + int(raw.get(outcome, 0))
    metrics.durable.submitted = submitted
    metrics.durable.terminal = terminal
