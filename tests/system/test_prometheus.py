"""Grafana dashboards and Prometheus alert rules, proven against a real Prometheus.

The live test starts the real processes (mock upstream with faults, ``budgeter api``, two
scraped workers and a victim worker that is SIGKILLed mid-flight), drives a workload that
gives every metric samples (refusals, deferrals, cache hits, upstream errors, a reaped
reservation, dead letters), lets the real ``prometheus`` binary scrape it all and evaluate
``deploy/prometheus/alerts.yml``, then runs every panel query of both dashboards and every
alert rule's expression, and requires data from each. ``promtool`` checks the rules and the
configuration and unit-tests that every alert fires on the series it is written for.

Without a ``prometheus``/``promtool`` binary the tests that need one are skipped, unless
``BUDGETER_REQUIRE_PROMETHEUS=1`` (then they fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import pytest
import yaml

from budgeter.admission.admission import Admission
from budgeter.metrics import Metrics
from budgeter.store.client import make_redis
from budgeter.store.embedded import free_port
from budgeter.store.keys import TenantKeys
from tests.helpers import listen_args, read_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = {
    "overview": REPO / "grafana" / "dashboards" / "budgeter-overview.json",
    "tenant": REPO / "grafana" / "dashboards" / "budgeter-tenant.json",
}
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DEPLOY_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = REPO / "grafana" / "provisioning" / "dashboards" / "budgeter.yml"
DATASOURCE_UID = "budgeter-prometheus"
# Redis-state gauges: shared state, exported by the API process, aggregated with max
STATE_GAUGES = (
    "budgeter_queue_depth",
    "budgeter_queue_oldest_age_seconds",
    "budgeter_inflight_requests",
    "budgeter_budget_remaining_tokens",
)
ADMIN_TOKEN = "prom-test-admin-token"
# what Grafana would substitute; $__rate_interval is 1m for a 15s scrape interval
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
# `<expression> <comparison> <number>`: the expression is what must return data
RULE_SHAPE = re.compile(
    r"^(?P<lhs>.*\S)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<threshold>[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*$",
    re.S,
)


def _binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if found:
        return found
    reason = f"the real `{name}` binary is not installed (apt-get install prometheus)"
    if os.environ.get("BUDGETER_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{reason}, and BUDGETER_REQUIRE_PROMETHEUS=1")
    pytest.skip(reason)


def _load_dashboard(name: str) -> dict[str, Any]:
    return json.loads(DASHBOARDS[name].read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels of a collapsed row
    return found


def _substitute(expr: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"no value for ${name} in {expr}"
        return variables[name]

    done = re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)
    assert "$" not in done, done
    return done


def _load_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _split_rule(expr: str) -> tuple[str, str, float]:
    match = RULE_SHAPE.match(expr.strip())
    assert match, f"alert expr is not `<expression> <comparison> <number>`: {expr}"
    return match["lhs"].strip(), match["op"], float(match["threshold"])


def _one_line(expr: str) -> str:
    return " ".join(expr.split())


# static checks (no binary needed) ------------------------------------------------------


def test_dashboards_are_provisionable_and_every_panel_is_documented() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        (DATASOURCE_UID, "prometheus", "http://prometheus:9090")
    ]
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"

    exprs = ""
    for name in DASHBOARDS:
        dashboard = _load_dashboard(name)
        assert dashboard["schemaVersion"] == 39
        assert dashboard["uid"] == f"budgeter-{name}"
        ids = [p["id"] for p in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in _panels(dashboard):
            where = f"{name}: panel {panel.get('title')!r}"
            assert panel.get("title"), where
            assert panel.get("description"), f"{where} has no description"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
            assert panel["targets"], f"{where} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID, where
                assert target["expr"].strip(), where
                exprs += target["expr"] + "\n"
                for gauge in STATE_GAUGES:  # shared Redis state: never summed
                    if gauge in target["expr"]:
                        assert re.search(rf"max by \([^)]*\) \({gauge}\b", target["expr"]), (
                            f"{where}: aggregate {gauge} with max by (...)"
                        )
                if "rate(" in target["expr"]:
                    windows = re.findall(r"\[([^\]]+)\]", target["expr"])
                    assert all(w in ("$__rate_interval", "1h") for w in windows), where
    tenant = _load_dashboard("tenant")
    [variable] = tenant["templating"]["list"]
    assert variable["name"] == "tenant"
    assert variable["query"]["query"] == "label_values(budgeter_jobs_total, tenant)"
    assert variable["datasource"]["uid"] == DATASOURCE_UID
    for panel in _panels(tenant):
        for target in panel["targets"]:
            if "budgeter_upstream" in target["expr"] or "budgeter_estimate" in target["expr"]:
                continue  # no tenant label: shown account-wide
            if "count_tokens_cache" in target["expr"]:
                continue
            assert 'tenant="$tenant"' in target["expr"], panel["title"]
    # every metric of the catalogue is on a dashboard
    for metric in Metrics().registry.collect():
        assert metric.name in exprs, f"{metric.name} is on no dashboard"


def test_alert_rules_follow_the_conventions() -> None:
    rules = _load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        where = rule["alert"]
        assert rule.get("for"), f"{where} has no `for`"
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), where
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{where} has no {key}"
        assert "\n" not in rule["annotations"]["runbook"].strip(), f"{where}: one-line runbook"
        _split_rule(rule["expr"])
        for gauge in STATE_GAUGES:
            if gauge in rule["expr"]:
                assert re.search(rf"max by \([^)]*\) \({gauge}\b", rule["expr"]), where


# promtool: syntax and unit tests ---------------------------------------------------------


async def _run(*args: str, timeout_s: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def _estimate_buckets() -> list[str]:
    for metric in Metrics().registry.collect():
        if metric.name == "budgeter_estimate_error_ratio":
            return [s.labels["le"] for s in metric.samples if s.name.endswith("_bucket")]
    raise AssertionError("budgeter_estimate_error_ratio is not in the catalogue")


def _histogram(share_at_or_below: Callable[[float], float], per_min: int = 600) -> list[dict]:
    """Series of budgeter_estimate_error_ratio_bucket growing by ``per_min`` observations a
    minute, ``share_at_or_below(le)`` of them at or below ``le``."""
    series = []
    for le in _estimate_buckets():
        bound = math.inf if le == "+Inf" else float(le)
        step = round(per_min * share_at_or_below(bound))
        series.append(
            {
                "series": f'budgeter_estimate_error_ratio_bucket{{le="{le}",job="w"}}',
                "values": f"0+{step}x200",
            }
        )
    return series


def _promtool_unit_tests(rule_file: Path) -> dict[str, Any]:
    """Each alert fires on the series it is written for, after its `for`, with its labels;
    none fires on healthy series."""
    wk = 'job="budgeter-worker",instance="w1:9108"'
    api = 'job="budgeter-api",instance="api:8080"'
    dur = "budgeter_upstream_request_duration_seconds_count"

    def alert(name: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
        return {
            "eval_time": at,
            "alertname": name,
            "exp_alerts": [{"exp_labels": dict(lab)} for lab in labels],
        }

    healthy = {
        "interval": "1m",
        "input_series": [
            {"series": f"up{{{wk}}}", "values": "1x200"},
            {"series": f"up{{{api}}}", "values": "1x200"},
            {
                "series": f'budgeter_budget_remaining_tokens{{tenant="a",period="day",{api}}}',
                "values": "900000x200",
            },
            {
                "series": f'budgeter_tokens_total{{tenant="a",model="m",kind="output",{wk}}}',
                "values": "0+600x200",
            },
            {"series": f'budgeter_queue_oldest_age_seconds{{tenant="a",{api}}}', "values": "5x200"},
            {"series": f'{dur}{{route="messages",status="200",{wk}}}', "values": "0+990x200"},
            {"series": f'{dur}{{route="messages",status="429",{wk}}}', "values": "0+10x200"},
            {"series": f'{dur}{{route="count_tokens",status="200",{wk}}}', "values": "0+900x200"},
            {
                "series": f'budgeter_reaped_reservations_total{{tenant="a",action="charged",{wk}}}',
                "values": "2x200",
            },
            *_histogram(lambda le: 0.0 if le < 0.5 else 0.5 if le < 0.9 else 1.0),
        ],
        "alert_rule_test": [
            alert(rule["alert"], at) for rule in _load_rules() for at in ("30m", "150m")
        ],
    }
    budget = {
        "interval": "1m",
        "input_series": [
            # 20 tokens/s against 50,000 left: gone in 2,500 s
            {
                "series": f'budgeter_budget_remaining_tokens{{tenant="t",period="day",{api}}}',
                "values": "50000x120",
            },
            {
                "series": f'budgeter_tokens_total{{tenant="t",model="m",kind="output",{wk}}}',
                "values": "0+1200x120",
            },
            # a minute budget is not alerted on; a slow burn is not either
            {
                "series": f'budgeter_budget_remaining_tokens{{tenant="t",period="minute",{api}}}',
                "values": "10x120",
            },
            {
                "series": f'budgeter_budget_remaining_tokens{{tenant="u",period="month",{api}}}',
                "values": "900000000x120",
            },
            {
                "series": f'budgeter_tokens_total{{tenant="u",model="m",kind="input",{wk}}}',
                "values": "0+60x120",
            },
            {
                "series": f'budgeter_budget_remaining_tokens{{tenant="z",period="day",{api}}}',
                "values": "0x120",
            },
        ],
        "alert_rule_test": [
            alert("BudgetExhaustionSoon", "10m"),  # pending: `for` not elapsed
            alert(
                "BudgetExhaustionSoon",
                "90m",
                {"severity": "warning", "tenant": "t", "period": "day"},
            ),
            alert("BudgetExhausted", "3m"),
            alert("BudgetExhausted", "10m", {"severity": "info", "tenant": "z", "period": "day"}),
        ],
    }
    queue = {
        "interval": "1m",
        "input_series": [
            {
                "series": f'budgeter_queue_oldest_age_seconds{{tenant="q",{api}}}',
                "values": "0+60x40",
            },
            # the same gauge from a second process is not added up
            {
                "series": f'budgeter_queue_oldest_age_seconds{{tenant="q",{wk}}}',
                "values": "0+60x40",
            },
        ],
        "alert_rule_test": [
            alert("QueueOldestJobTooOld", "18m"),
            alert("QueueOldestJobTooOld", "25m", {"severity": "warning", "tenant": "q"}),
        ],
    }
    upstream = {
        "interval": "1m",
        "input_series": [
            {"series": f'{dur}{{route="messages",status="200",{wk}}}', "values": "0+540x60"},
            {"series": f'{dur}{{route="messages",status="500",{wk}}}', "values": "0+30x60"},
            {"series": f'{dur}{{route="messages",status="error",{wk}}}', "values": "0+30x60"},
            {"series": f'{dur}{{route="count_tokens",status="200",{wk}}}', "values": "0+600x60"},
        ],
        "alert_rule_test": [
            alert("UpstreamErrorRatioHigh", "8m"),
            alert("UpstreamErrorRatioHigh", "30m", {"severity": "warning", "route": "messages"}),
        ],
    }
    down = {
        "interval": "1m",
        "input_series": [
            {"series": f"up{{{api}}}", "values": "0x10"},
            {"series": 'up{job="budgeter-worker",instance="w2:9108"}', "values": "0x10"},
        ],
        "alert_rule_test": [
            alert("NoWorkerUp", "1m"),
            alert("NoWorkerUp", "5m", {"severity": "critical"}),
            alert("ApiDown", "5m", {"severity": "critical"}),
        ],
    }
    absent = {  # no worker discovered at all
        "interval": "1m",
        "input_series": [{"series": f"up{{{api}}}", "values": "1x10"}],
        "alert_rule_test": [
            alert("NoWorkerUp", "5m", {"severity": "critical"}),
            alert("ApiDown", "5m"),
        ],
    }
    rare = {
        "interval": "1m",
        "input_series": [
            # a counter exported at 0 from the start (budgeter.metrics.TenantSeries) that
            # moves for the first time (3 reaps at minute 20) is seen
            {
                "series": f'budgeter_reaped_reservations_total{{tenant="r",action="charged",{wk}}}',
                "values": "0x20 3x40",
            },
            # an existing counter that moves is seen too
            {"series": f'budgeter_dead_lettered_total{{tenant="d",{wk}}}', "values": "1x20 2x40"},
        ],
        "alert_rule_test": [
            alert(
                "ReservationsReaped",
                "23m",
                {"severity": "warning", "tenant": "r", "action": "charged"},
            ),
            alert("ReservationsReaped", "50m"),  # 15 minutes later it is over
            alert("JobsDeadLettered", "23m", {"severity": "warning", "tenant": "d"}),
            alert("JobsDeadLettered", "50m"),
        ],
    }
    hooks = 'budgeter_webhook_events_total{result="%s",' + wk + "}"
    webhook = {  # the receiver answers 500 for 40 minutes, then recovers
        "interval": "1m",
        "input_series": [
            {"series": hooks % "delivered", "values": "0+2x10 20x40 20+2x40"},
            {"series": hooks % "retried", "values": "0x10 0+3x40 120x40"},
            {"series": hooks % "failed", "values": "0x90"},
        ],
        "alert_rule_test": [
            alert("WebhookDeliveriesFailing", "8m"),
            alert("WebhookDeliveriesFailing", "20m"),  # failing, but `for` not elapsed
            alert("WebhookDeliveriesFailing", "40m", {"severity": "warning"}),
            alert("WebhookDeliveriesFailing", "85m"),  # delivering again
        ],
    }
    under = {  # half of the settles bill 1.1-1.5x the reservation
        "interval": "1m",
        "input_series": _histogram(lambda le: 0.0 if le < 0.9 else 0.5 if le < 1.5 else 1.0),
        "alert_rule_test": [
            alert("EstimateUnderReserving", "20m"),
            alert("EstimateUnderReserving", "95m", {"severity": "warning"}),
            alert("EstimateOverReserving", "150m"),
        ],
    }
    over = {  # everything uses less than 10% of its reservation
        "interval": "1m",
        "input_series": _histogram(lambda le: 0.0 if le < 0.1 else 1.0),
        "alert_rule_test": [
            alert("EstimateOverReserving", "30m"),
            alert("EstimateOverReserving", "150m", {"severity": "info"}),
            alert("EstimateUnderReserving", "150m"),
        ],
    }
    return {
        "rule_files": [str(rule_file)],
        "evaluation_interval": "1m",
        "tests": [healthy, budget, queue, upstream, down, absent, rare, webhook, under, over],
    }


async def test_promtool_checks_and_unit_tests_every_alert(tmp_path: Path) -> None:
    promtool = _binary("promtool")
    code, out = await _run(promtool, "check", "rules", str(ALERTS))
    assert code == 0, out
    code, out = await _run(promtool, "check", "config", str(DEPLOY_CONFIG))
    assert code == 0, out
    # the unit tests compare labels; annotations (templated text) are checked above
    rules = [{k: v for k, v in r.items() if k != "annotations"} for r in _load_rules()]
    rule_file = tmp_path / "rules.json"
    rule_file.write_text(json.dumps({"groups": [{"name": "budgeter", "rules": rules}]}))
    tests = _promtool_unit_tests(rule_file)
    tested = {t["alertname"] for group in tests["tests"] for t in group["alert_rule_test"]}
    assert tested == {r["alert"] for r in rules}
    fired = {
        t["alertname"]
        for group in tests["tests"][1:]
        for t in group["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert fired == {r["alert"] for r in rules}, "every alert is shown to fire"
    test_file = tmp_path / "alerts_test.json"
    test_file.write_text(json.dumps(tests, indent=1))
    code, out = await _run(promtool, "test", "rules", str(test_file))
    assert code == 0, out


# the live test -----------------------------------------------------------------------------


@dataclass
class Processes:
    """Subprocesses with their output in files; stopped (SIGTERM, then SIGKILL) at the end."""

    logdir: Path
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    logs: dict[str, TextIO] = field(default_factory=dict)

    async def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = (self.logdir / f"{name}.log").open("w")
        self.logs[name] = log
        self.procs[name] = await asyncio.create_subprocess_exec(
            *args, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env
        )

    async def start_listening(self, name: str, *args: str, env: dict[str, str]) -> int:
        """Start a budgeter process on port 0; returns the port it bound, once it listens."""
        port_file = self.logdir / f"{name}.port"
        await self.start(name, *args, *listen_args(port_file), env=env)
        try:
            return await read_port(port_file, self.procs[name], 30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail(name)}") from None

    def alive(self, name: str) -> bool:
        return self.procs[name].returncode is None

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(self.tail(name) for name in self.procs)

    async def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for log in self.logs.values():
            log.close()


async def _until(
    what: str,
    check: Callable[[], Awaitable[Any]],
    procs: Processes,
    timeout_s: float = 60,
    interval_s: float = 0.2,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{procs.tails()}")
        await asyncio.sleep(interval_s)


class Prom:
    def __init__(self, client: httpx.AsyncClient, base: str) -> None:
        self.client, self.base = client, base

    async def query(self, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query, now or ``at`` (Unix seconds)."""
        data = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        response = await self.client.post(f"{self.base}/api/v1/query", data=data)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    async def get(self, path: str, **params: str) -> Any:
        response = await self.client.get(f"{self.base}{path}", params=params)
        body = response.json()
        assert body["status"] == "success", (path, body)
        return body["data"]


def _message(text: str, max_tokens: int, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }


def _batch(prefix: str, count: int, *, max_tokens: int, model: str) -> dict[str, Any]:
    return {
        "requests": [
            {
                "custom_id": f"{prefix}-{i}",
                "params": _message(f"question {i % 30} about budgets", max_tokens, model),
            }
            for i in range(count)
        ]
    }


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


def _show(result: list[dict[str, Any]]) -> str:
    shown = []
    for series in result[:3]:
        labels = ",".join(f"{k}={v}" for k, v in series["metric"].items() if k != "__name__")
        shown.append(f"{{{labels}}} {float(series['value'][1]):.4g}")
    more = f" (+{len(result) - 3})" if len(result) > 3 else ""
    return "; ".join(shown) + more


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, redis_url: str) -> AsyncIterator[dict[str, Any]]:
    """Mock upstream (20% faults, seeded), API and Prometheus; the test adds the workers
    (:func:`_start_workers` tells Prometheus where they listen)."""
    prometheus = _binary("prometheus")
    prefix = f"promtest-{uuid.uuid4().hex[:8]}"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETER_")}
    env = {
        **inherited,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BUDGETER_KEY_PREFIX": prefix,
        "BUDGETER_MAINTENANCE_SECONDS": "1",
        "BUDGETER_LOG_LEVEL": "WARNING",
        # a killed worker's jobs come back and its reservations are reaped within seconds
        "BUDGETER_LEASE_SECONDS": "2",
        "BUDGETER_RESERVATION_GRACE_SECONDS": "0.5",
        "BUDGETER_DRAIN_SECONDS": "3",
    }
    budgeter = (sys.executable, "-m", "budgeter")
    promdir = tmp_path / "prometheus"
    promdir.mkdir()
    workers_sd = promdir / "workers.json"  # file service discovery: the scraped workers
    workers_sd.write_text("[]\n")
    procs = Processes(tmp_path)
    try:
        ports = {
            "mock": await procs.start_listening(
                "mock",
                *budgeter,
                "mock-upstream",
                "--latency-ms",
                "40",
                "--fault-rate",
                "0.2",
                "--fault-kinds",
                "429,500",
                "--retry-after",
                "0.01",
                "--seed",
                "21",
                env=env,
            )
        }
        env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{ports['mock']}"
        ports["api"] = await procs.start_listening("api", *budgeter, "api", env=env)
        ports["prom"] = free_port()  # Prometheus cannot report a port it bound itself
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {
                    "job_name": "budgeter-api",
                    "static_configs": [{"targets": [f"127.0.0.1:{ports['api']}"]}],
                },
                {
                    "job_name": "budgeter-worker",
                    "file_sd_configs": [{"files": [str(workers_sd)], "refresh_interval": "1s"}],
                },
            ],
        }
        (promdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copy(ALERTS, promdir / "alerts.yml")
        await procs.start(
            "prometheus",
            prometheus,
            f"--config.file={promdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={promdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['prom']}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        )
        yield {
            "procs": procs,
            "ports": ports,
            "env": env,
            "prefix": prefix,
            "budgeter": budgeter,
            "promdir": promdir,
            "workers_sd": workers_sd,
        }
    finally:
        await procs.stop_all()


def _scrape_workers(workers_sd: Path, ports: list[int]) -> None:
    """Point Prometheus' file service discovery at these worker ports (renamed into place:
    Prometheus never reads half a file)."""
    tmp = workers_sd.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}" for port in ports]}]))
    tmp.replace(workers_sd)


# every wait below is bounded (_until, httpx's timeout): their sum, not a shorter overall
# timeout, bounds the test (typically ~60 s)
@pytest.mark.timeout(420)
async def test_every_dashboard_panel_and_alert_returns_data_from_real_prometheus(
    tmp_path: Path, redis_url: str, artifacts_dir: Path
) -> None:
    started = time.monotonic()
    async with (
        _stack(tmp_path, redis_url) as stack,
        httpx.AsyncClient(timeout=10) as http,
    ):
        procs: Processes = stack["procs"]
        ports, env, budgeter = stack["ports"], stack["env"], stack["budgeter"]
        api = f"http://127.0.0.1:{ports['api']}"
        prom = Prom(http, f"http://127.0.0.1:{ports['prom']}")
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}

        async def answers(url: str) -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(url)).status_code == 200
            return False

        for name, url in (
            ("mock upstream", f"http://127.0.0.1:{ports['mock']}/mock/stats"),
            ("api", f"{api}/healthz"),
            ("prometheus", f"{prom.base}/-/ready"),
        ):
            await _until(f"{name} to answer", lambda url=url: answers(url), procs, 30)

        # tenants: alpha plain, beta rate-limited and concurrency-capped, gamma a tiny budget
        # and alpha's child (alpha is a real parent for the tenant dashboard's Parent panels)
        policies = {
            "alpha": {"weight": 2, "budgets": {"day": 5_000_000}},
            "beta": {
                "budgets": {"month": 50_000_000},
                "rate": {"rpm": 600, "otpm": 3000},
                "max_concurrency": 2,
            },
            "gamma": {"parent": "alpha", "budgets": {"day": 1500}},
        }
        keys = {}
        for tenant, policy in policies.items():
            response = await http.put(f"{api}/admin/tenants/{tenant}", json=policy, headers=admin)
            assert response.status_code in (200, 201), response.text
            response = await http.post(f"{api}/admin/tenants/{tenant}/keys", headers=admin)
            assert response.status_code == 201, response.text
            keys[tenant] = response.json()["key"]

        batches: dict[str, str] = {}  # batch id -> tenant

        async def submit(tenant: str, body: dict[str, Any]) -> None:
            response = await http.post(
                f"{api}/v1/messages/batches", json=body, headers={"x-api-key": keys[tenant]}
            )
            assert response.status_code == 200, response.text
            batches[response.json()["id"]] = tenant

        async def sync(tenant: str, max_tokens: int, model: str, text: str) -> int:
            response = await http.post(
                f"{api}/v1/messages",
                json=_message(text, max_tokens, model),
                headers={"x-api-key": keys[tenant], "anthropic-version": "2023-06-01"},
            )
            return response.status_code

        # 1. a victim worker takes alpha's first jobs and is SIGKILLed with requests in
        #    flight: its reservations are reaped (charged) and its leases reclaimed
        await procs.start(
            "victim",
            *budgeter,
            "worker",
            "--concurrency",
            "8",
            "--metrics-port",
            "0",
            env=env,
        )
        await submit("alpha", _batch("a1", 80, max_tokens=64, model="claude-sonnet-4-6"))
        redis = make_redis(redis_url)
        try:
            sent_key = TenantKeys.of(stack["prefix"], "alpha").resv_sent

            async def victim_in_flight() -> bool:
                assert procs.alive("victim"), procs.tail("victim")
                return await redis.hlen(sent_key) >= 2

            await _until(
                "the victim worker to have requests in flight", victim_in_flight, procs, 30, 0.005
            )
            await procs.kill("victim")
            # no process is left to reap the victim's reservations or reclaim its leases;
            # they are held until Prometheus has scraped the workers' counters at 0, so that
            # increase() sees the reaped (and reclaimed) ones as a real worker's would
            victim = await _hold(redis, TenantKeys.of(stack["prefix"], "alpha"))

            # 2. the scraped workers: w2 gives up at the first failure (dead letters)
            dead_letter_env = {
                **env,
                "BUDGETER_MAX_ATTEMPTS": "1",
                "BUDGETER_UPSTREAM_MAX_ATTEMPTS": "1",
            }
            for name, worker_env in (("w1", env), ("w2", dead_letter_env)):
                ports[name] = await procs.start_listening(
                    name, *budgeter, "worker", "--concurrency", "8", env=worker_env
                )
            _scrape_workers(stack["workers_sd"], [ports["w1"], ports["w2"]])

            # Prometheus scrapes every process before the rest of the workload, so that its
            # counters are seen moving (rate() > 0), not only at their final values
            async def targets_up() -> bool:
                targets = (await prom.get("/api/v1/targets"))["activeTargets"]
                return len(targets) == 3 and all(t["health"] == "up" for t in targets)

            await _until("Prometheus to scrape all 3 targets", targets_up, procs, 30)

            async def zeros_scraped() -> bool:  # before any event: budgeter.metrics.TenantSeries
                found = await prom.query(
                    'budgeter_reaped_reservations_total{job="budgeter-worker",tenant="alpha"} == 0'
                )
                return len({s["metric"]["instance"] for s in found}) == 2

            await _until("the workers' counters at 0 in Prometheus", zeros_scraped, procs, 30)
            await victim.release()
        finally:
            await redis.aclose()

        async def all_ended() -> bool:
            for batch_id, tenant in batches.items():
                response = await http.get(
                    f"{api}/v1/messages/batches/{batch_id}", headers={"x-api-key": keys[tenant]}
                )
                if response.json()["processing_status"] != "ended":
                    return False
            return True

        # warm-up: the tenant-labelled counters start at 0, but budgeter_tokens_total{model}
        # (an open-ended label) is created at a model's first settle, and Prometheus cannot
        # count a series' first value; a burst that starts and ends between two scrapes would
        # show rate() == 0. So every tenant's token series exist before the burst.
        for tenant in policies:
            await submit(
                tenant, _batch(f"{tenant[0]}w", 4, max_tokens=16, model="claude-sonnet-4-6")
            )
        await _until("the warm-up batches to end", all_ended, procs, 30)

        async def series_seen() -> bool:
            tokens = await prom.query("count by (tenant) (budgeter_tokens_total)")
            return {s["metric"]["tenant"] for s in tokens} >= set(policies)

        await _until("every tenant's series in Prometheus", series_seen, procs, 15)
        # same contents again (count_tokens cache hits), another model, beta, gamma
        await submit("alpha", _batch("a2", 40, max_tokens=64, model="claude-haiku-4-5"))
        await submit("beta", _batch("b", 16, max_tokens=32, model="claude-sonnet-4-6"))
        gamma = _batch("g", 40, max_tokens=64, model="claude-sonnet-4-6")
        gamma["requests"].append(
            {"custom_id": "g-huge", "params": _message("huge", 5000, "claude-sonnet-4-6")}
        )  # larger than the whole budget: too_large
        await submit("gamma", gamma)
        # synchronous calls through the API process, on a model no batch is calling right
        # now: the mock's 429s pause a model account-wide (per model, by design), and the
        # workers' own traffic on sonnet would otherwise decide how many of these pass
        statuses = [await sync("alpha", 64, "claude-opus-4-5", f"sync {i}") for i in range(4)]
        assert statuses.count(200) >= 3, statuses
        # beta's otpm bucket (3000/min) holds one 2000-token reservation, not two: with one
        # held here, every call asking for 2000 more is DEFERred, answered 429 at once
        # (max_wait_seconds 0), whatever else runs
        beta_redis = make_redis(redis_url)
        admission = Admission(beta_redis, prefix=stack["prefix"])

        async def hold() -> bool:  # DEFERred while beta's batch has 2 jobs in flight
            decision = await admission.reserve(
                "beta", "held-by-the-test", 10, 2000, model="claude-haiku-4-5", hold_ms=60_000
            )
            return decision.kind == "ADMIT"

        try:
            await _until("a beta reservation held by the test", hold, procs, 30, 0.05)
            beta_sync = await asyncio.gather(
                *(sync("beta", 2000, "claude-haiku-4-5", f"long {i}") for i in range(3))
            )
            await admission.release("beta", "held-by-the-test")
        finally:
            await beta_redis.aclose()
        assert 429 in beta_sync, beta_sync
        assert beta_sync == [429, 429, 429], beta_sync

        await _until("every batch to end", all_ended, procs, 60)
        # gamma's day budget is (nearly) spent: refused with budget_exhausted_error
        assert await sync("gamma", 1000, "claude-sonnet-4-6", "after the budget") == 429
        workload_s = time.monotonic() - started
        ended_at = time.time()

        # 3. Prometheus has scraped every target after the end (gauges refreshed since)
        async def scraped_after_end() -> bool:
            targets = (await prom.get("/api/v1/targets"))["activeTargets"]
            fresh = [
                t
                for t in targets
                if t["health"] == "up" and _rfc3339(t["lastScrape"]) > ended_at + 3
            ]
            return len(targets) == 3 and len(fresh) == 3

        await _until("every target scraped after the workload", scraped_after_end, procs, 30)
        # panels are evaluated at this moment: their rate() windows end just after the
        # workload, whatever the waits below take (a fast workload could otherwise have
        # slid out of a 1m window by then)
        evaluated_at = time.time()

        async def real_rare_events() -> bool:
            reaped = await prom.query("sum(budgeter_reaped_reservations_total) > 0")
            dead = await prom.query("sum(budgeter_dead_lettered_total) > 0")
            return bool(reaped and dead)

        await _until("real reaped and dead-lettered counters", real_rare_events, procs, 20)

        # the Redis-state gauges come from the API process, for every tenant
        for gauge in STATE_GAUGES:
            found = await prom.query(f'{gauge}{{job="budgeter-api"}}')
            assert {s["metric"]["tenant"] for s in found} >= set(policies), (gauge, found)

        # alpha is gamma's parent: what gamma used is charged to alpha too, and the Parent
        # panels show alpha's budget less its whole subtree's use (the API's gauge, read from
        # Redis at scrape time: nothing has changed since the workload ended)
        response = await http.get(f"{api}/admin/tenants/alpha/usage", headers=admin)
        assert response.status_code == 200, response.text
        usage = response.json()
        [child] = usage["children"]
        gamma_day = next(t for t in child["totals"] if t["period"] == "day")
        assert child["tenant"] == "gamma" and gamma_day["used"] > 0, child
        alpha_day = next(b for b in usage["budgets"] if (b["period"], b["model"]) == ("day", None))
        assert usage["rollup"]["tenants"] == 2
        for panel in _panels(_load_dashboard("tenant")):
            if panel["title"] == "Parent: remaining budget (whole subtree)":
                expr = _substitute(panel["targets"][0]["expr"], {**GRAFANA_VARS, "tenant": "alpha"})
                found = await prom.query(expr, at=evaluated_at)
                assert [(s["metric"]["period"], float(s["value"][1])) for s in found] == [
                    ("day", float(alpha_day["remaining"]))
                ], (found, alpha_day)
                break
        else:
            raise AssertionError("the tenant dashboard has no 'Parent: remaining' panel")

        # the template variable lists the tenants
        tenants = await prom.get(
            "/api/v1/label/tenant/values", **{"match[]": "budgeter_jobs_total"}
        )
        assert set(policies) <= set(tenants), tenants

        # 4. every panel query of both dashboards returns data
        lines = [
            "# Prometheus queries proven against a live Prometheus",
            "",
            f"Prometheus scraped the API and two workers every 1s (generated by "
            f"`{Path(__file__).relative_to(REPO)}`); `$__rate_interval` = 1m; tenant dashboard "
            f"checked for tenants {', '.join(policies)} (gamma a child of alpha; values below: "
            "tenant alpha).",
            "",
            "## Dashboard panels",
            "",
            "| dashboard | panel | unit | expr | result (first series) |",
            "| --- | --- | --- | --- | --- |",
        ]
        empty: list[str] = []
        checked = 0
        for name in DASHBOARDS:
            dashboard = _load_dashboard(name)
            for panel in _panels(dashboard):
                for target in panel["targets"]:
                    shown = ""
                    for tenant in policies if name == "tenant" else ["alpha"]:
                        expr = _substitute(target["expr"], {**GRAFANA_VARS, "tenant": tenant})
                        result = await prom.query(expr, at=evaluated_at)
                        checked += 1
                        # data, and a number (a ratio of rates that did not move is NaN)
                        if not any(not math.isnan(v) for v in _values(result)):
                            empty.append(f"{name} / {panel['title']} [{tenant}]: {expr}")
                        if tenant == "alpha":
                            shown = _show(result)
                    unit = panel["fieldConfig"]["defaults"]["unit"]
                    lines.append(
                        f"| {name} | {panel['title']} | {unit} | "
                        f"`{_md(_one_line(target['expr']))}` | {_md(shown)} |"
                    )
        assert not empty, "panel queries without data (or only NaN):\n" + "\n".join(empty)

        # 5. every alert rule: Prometheus loaded it, evaluates it without error, and the
        #    expression before its comparison returns data
        groups = (await prom.get("/api/v1/rules"))["groups"]
        loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
        rules = _load_rules()
        assert set(loaded) == {rule["alert"] for rule in rules}

        async def evaluated() -> bool:
            groups = (await prom.get("/api/v1/rules"))["groups"]
            return all(
                rule["health"] == "ok" for group in groups for rule in group["rules"]
            ) and not any(group["lastEvaluation"].startswith("0001") for group in groups)

        await _until("every rule to be evaluated without error", evaluated, procs, 15)
        lines += [
            "",
            "## Alert rules",
            "",
            "| alert | severity | for | expression (tested) | threshold | result | state |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        # the workload is meant to trip these (pending: their `for` has not elapsed)
        expected = {
            ("UpstreamErrorRatioHigh", "messages"),  # 20% of messages attempts fault
            ("ReservationsReaped", "alpha"),  # the victim worker
            ("BudgetExhaustionSoon", "gamma"),  # 1,500 tokens a day
            ("JobsDeadLettered", "*"),  # w2 gives up at the first failure
        }
        active: set[tuple[str, str]] = set()

        async def tripped() -> list[dict[str, Any]] | None:
            alerts = (await prom.get("/api/v1/alerts"))["alerts"]
            active.clear()
            for a in alerts:
                name = a["labels"]["alertname"]
                active.add((name, a["labels"].get("tenant", a["labels"].get("route", ""))))
                active.add((name, "*"))
            return alerts if expected <= active else None

        try:
            alerts = await _until("the alerts the workload trips", tripped, procs, 15)
        finally:
            print(f"active alerts: {sorted(active)}")
        states: dict[str, list[dict[str, Any]]] = {}
        for alert in alerts:
            states.setdefault(alert["labels"]["alertname"], []).append(alert)
        for rule in rules:
            lhs, op, threshold = _split_rule(rule["expr"])
            result = await prom.query(lhs)
            checked += 1
            if not result:
                empty.append(f"alert {rule['alert']}: {lhs}")
            await prom.query(rule["expr"])  # the whole rule is a valid query too
            state = ", ".join(
                f"{a['state']} {{{_labels(a['labels'])}}}" for a in states.get(rule["alert"], [])
            )
            lines.append(
                f"| {rule['alert']} | {rule['labels']['severity']} | {rule['for']} | "
                f"`{_md(_one_line(lhs))}` | {op} {threshold:g} | {_md(_show(result))} | "
                f"{_md(state) or 'inactive'} |"
            )
        assert not empty, "alert expressions without data:\n" + "\n".join(empty)

        for quiet in ("NoWorkerUp", "ApiDown", "QueueOldestJobTooOld"):
            assert quiet not in states, (quiet, states[quiet])

        # 6. promtool accepts the rules and the generated configuration
        promtool = _binary("promtool")
        code, out = await _run(promtool, "check", "rules", str(ALERTS))
        assert code == 0, out
        code, out = await _run(
            promtool, "check", "config", str(stack["promdir"] / "prometheus.yml")
        )
        assert code == 0, out

        lines += [
            "",
            f"{checked} queries, all with data. Workload (processes up to every batch ended): "
            f"{workload_s:.1f}s; whole test {time.monotonic() - started:.1f}s.",
            "",
        ]
        (artifacts_dir / "prometheus-queries.md").write_text("\n".join(lines))


@dataclass
class _Held:
    """Reservations and leases of a dead worker, kept from the reaper and the reclaimer."""

    redis: Any
    keys: TenantKeys
    reservations: list[str]
    leases: list[str]

    async def release(self) -> None:
        """Past their deadline now: the next maintenance pass reaps and reclaims them."""
        if self.reservations:
            await self.redis.zadd(
                self.keys.resv_deadline, dict.fromkeys(self.reservations, 0), xx=True
            )
        if self.leases:
            await self.redis.zadd(self.keys.leases, dict.fromkeys(self.leases, 0), xx=True)


async def _hold(redis: Any, keys: TenantKeys) -> _Held:
    far = (time.time() + 3600) * 1000
    held = _Held(
        redis,
        keys,
        [str(m) for m in await redis.zrange(keys.resv_deadline, 0, -1)],
        [str(m) for m in await redis.zrange(keys.leases, 0, -1)],
    )
    if held.reservations:
        await redis.zadd(keys.resv_deadline, dict.fromkeys(held.reservations, far), xx=True)
    if held.leases:
        await redis.zadd(keys.leases, dict.fromkeys(held.leases, far), xx=True)
    return held


def _rfc3339(text: str) -> float:
    """Prometheus' lastScrape (RFC 3339, up to nanoseconds) as a Unix time."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    assert match, text
    zone = "+00:00" if match[3] == "Z" else match[3]
    whole = datetime.fromisoformat(match[1] + zone).timestamp()
    return whole + float(f"0{match[2]}" if match[2] else 0)


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items() if k not in ("alertname", "severity"))


def _md(text: str) -> str:
    return text.replace("|", "\\|")
