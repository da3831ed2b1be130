"""Admin roles and the audit log (issue 17, item 7) against a real Redis: viewers read every
``/admin`` GET and never write (403 ``permission_error``); every admin write appends one
entry with the actor, request id, client, action, target and field-level changes, never a
secret; ``GET /admin/audit`` filters by target, actor and since and pages with a cursor."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.api.routes import ROUTES
from budgeter.settings import Settings
from budgeter.tenants.audit import (
    Actor,
    AuditLog,
    BadQueryError,
    FieldChange,
    diff,
    format_fields,
    parse_entry,
    parse_since,
    show_change,
)
from tests.api.test_admin_consistency import concrete
from tests.api.test_app import expect_error

ADMIN_TOKEN = "admin-secret-0123456789"
OPS_TOKEN = "ops-viewer-token-0123456789"
LEAD_TOKEN = "lead-admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
VIEWER = {"authorization": f"Bearer {OPS_TOKEN}"}
LEAD = {"authorization": f"Bearer {LEAD_TOKEN}"}


def app_settings(redis_url: str) -> Settings:
    """The API's settings here (and in tests/system/test_cluster.py, on the cluster)."""
    return Settings(
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        admin_tokens={  # type: ignore[arg-type]
            "ops": {"token": OPS_TOKEN, "role": "viewer"},
            "lead": {"token": LEAD_TOKEN, "role": "admin"},
        },
        upstream_url="http://127.0.0.1:9",
        auth_failures_per_minute=1_000_000,
    )


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    app = create_app(app_settings(redis_url), redis=redis)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def audit(client: TestClient, query: str = "", headers: dict[str, str] = ADMIN) -> Any:
    response = await client.get(f"/admin/audit{query}", headers=headers)
    assert response.status == 200, await response.text()
    return await response.json()


# the format, pure --------------------------------------------------------------------


def test_an_entry_round_trips_through_its_stream_fields() -> None:
    actor = Actor("ops", "10.0.0.1", "req_1")
    changes = [FieldChange(field="budgets.day", before=100, after=200)]
    fields = format_fields(actor, "tenant.update", "acme", changes)
    entry = parse_entry("1764662400000-3", fields)
    assert (entry.time_ms, entry.actor, entry.client, entry.request_id) == (
        1764662400000,
        "ops",
        "10.0.0.1",
        "req_1",
    )
    assert (entry.action, entry.target, entry.changes) == ("tenant.update", "acme", changes)


def test_the_diff_names_each_changed_leaf_as_tenants_apply_prints_it() -> None:
    before = {"budgets": {"day": 100, "hour": 5}, "weight": 2.0}
    after = {"budgets": {"day": 200}, "weight": 2.0, "rate": {"rpm": 60}}
    shown = [show_change(c) for c in diff(before, after)]
    assert shown == [
        "budgets.day: 100 → 200",
        "budgets.hour: 5 → (unset)",
        "rate.rpm: (unset) → 60",
    ]
    assert diff(before, before) == []
    assert [show_change(c) for c in diff(None, {"weight": 3})] == ["weight: (unset) → 3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", 1_000_000_000_000 - 86_400_000),
        ("90m", 1_000_000_000_000 - 5_400_000),
        ("7d", 1_000_000_000_000 - 7 * 86_400_000),
        ("1764547200000", 1764547200000),
        ("2025-12-01", 1764547200000),
        ("2025-12-01T00:00:00Z", 1764547200000),
        ("2025-12-01T01:00:00+01:00", 1764547200000),
    ],
)
def test_since_takes_times_spans_and_milliseconds(text: str, expected: int) -> None:
    assert parse_since(text, now_ms=1_000_000_000_000) == expected


def test_a_bad_since_is_one_clear_error() -> None:
    with pytest.raises(BadQueryError, match="since: not a time: 'yesterday'"):
        parse_since("yesterday", now_ms=0)


# roles -------------------------------------------------------------------------------


async def test_a_viewer_reads_every_admin_get_and_writes_nothing(client: TestClient) -> None:
    created = await client.put("/admin/tenants/acme", json={"weight": 2}, headers=ADMIN)
    assert created.status == 201
    for route in ROUTES:
        if not route.path.startswith("/admin"):
            continue
        path = concrete(route, "acme")
        answer = await client.request(route.method, path, headers=VIEWER, json={"weight": 1})
        if route.method == "GET":
            assert answer.status in (200, 404), (route.method, path, await answer.text())
        else:
            await expect_error(answer, 403, "permission_error")
            assert "viewer token 'ops' may only read" in (await answer.json())["error"]["message"]
    policy = await (await client.get("/admin/tenants/acme", headers=VIEWER)).json()
    assert policy["policy"]["weight"] == 2  # nothing the viewer sent was stored
    entries = (await audit(client, "", VIEWER))["data"]
    assert [e["action"] for e in entries] == ["tenant.create"]  # the refused writes: none


async def test_named_admin_tokens_write_and_are_named_in_the_log(client: TestClient) -> None:
    assert (await client.put("/admin/tenants/acme", json={}, headers=LEAD)).status == 201
    assert (await client.get("/admin/tenants/acme", headers=ADMIN)).status == 200
    bad = await client.get("/admin/tenants/acme", headers={"authorization": "Bearer nope"})
    await expect_error(bad, 401, "authentication_error")
    entry = (await audit(client))["data"][0]
    assert (entry["actor"], entry["action"], entry["target"]) == ("lead", "tenant.create", "acme")
    assert entry["client"] == "127.0.0.1"
    assert entry["request_id"].startswith("req_")


# the log -----------------------------------------------------------------------------


async def test_every_admin_write_is_logged_with_its_changes_and_never_a_secret(
    client: TestClient, redis: Redis
) -> None:
    merge = {**ADMIN, "content-type": "application/merge-patch+json"}
    steps = [
        client.put("/admin/tenants/acme", json={"budgets": {"day": 100}}, headers=ADMIN),
        client.put("/admin/tenants/acme", json={"budgets": {"day": 200}}, headers=ADMIN),
        client.patch("/admin/tenants/acme", data='{"rate": {"rpm": 60}}', headers=merge),
        client.post("/admin/tenants/acme/keys", headers=ADMIN),
        client.put("/admin/global-policy", json={"budgets": {"day": 10**6}}, headers=ADMIN),
    ]
    answers = []
    for step in steps:
        response = await step
        assert response.status in (200, 201), await response.text()
        answers.append(await response.json())
    key_id, key = answers[3]["id"], answers[3]["key"]
    revoked = await client.delete(f"/admin/tenants/acme/keys/{key_id}", headers=ADMIN)
    assert revoked.status == 200
    assert (await client.delete("/admin/tenants/acme", headers=ADMIN)).status == 200

    entries = (await audit(client))["data"]
    got = [(e["action"], e["target"]) for e in reversed(entries)]
    assert got == [
        ("tenant.create", "acme"),
        ("tenant.update", "acme"),
        ("tenant.update", "acme"),
        ("key.create", f"acme/key:{key_id}"),
        ("global_policy.update", "global-policy"),
        ("key.revoke", f"acme/key:{key_id}"),
        ("tenant.delete", "acme"),
    ]
    by_step = list(reversed(entries))
    assert [show_change(FieldChange(**c)) for c in by_step[1]["changes"]] == [
        "budgets.day: 100 → 200"
    ]
    assert [show_change(FieldChange(**c)) for c in by_step[2]["changes"]] == [
        "rate.rpm: (unset) → 60"
    ]
    assert {c["field"] for c in by_step[6]["changes"]} == {"budgets.day", "rate.rpm"}
    assert all(c["after_unset"] for c in by_step[6]["changes"])
    raw = json.dumps(await redis.xrange("budgeter:{audit}:log"), default=str)
    for secret in (key, ADMIN_TOKEN, OPS_TOKEN, LEAD_TOKEN):
        assert secret not in raw


async def test_the_log_filters_by_target_actor_and_since_and_pages(client: TestClient) -> None:
    for tenant in ("acme", "beta", "acme-2"):
        assert (await client.put(f"/admin/tenants/{tenant}", json={}, headers=ADMIN)).status == 201
    for weight in (2, 3, 4):
        answer = await client.put("/admin/tenants/acme", json={"weight": weight}, headers=LEAD)
        assert answer.status == 200
    key = await (await client.post("/admin/tenants/acme/keys", headers=ADMIN)).json()

    acme = (await audit(client, "?target=acme"))["data"]
    assert [e["target"] for e in acme] == [f"acme/key:{key['id']}", *["acme"] * 4]  # not acme-2
    lead = (await audit(client, "?actor=lead"))["data"]
    assert [e["changes"][0]["after"] for e in lead] == [4, 3, 2]
    future = (await audit(client, "?since=2999-01-01"))["data"]
    assert future == []

    seen, cursor = [], None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await audit(client, query)
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    every = [e["id"] for e in (await audit(client))["data"]]
    assert seen == every and len(every) == 7


async def test_a_tree_s_writes_are_logged_and_a_refused_one_is_not(client: TestClient) -> None:
    """A parent given, changed and dropped is a field change like any other; a write the
    tree refuses (a cycle) is answered 400 and leaves no entry."""
    merge = {**ADMIN, "content-type": "application/merge-patch+json"}
    assert (await client.put("/admin/tenants/org", json={}, headers=ADMIN)).status == 201
    made = await client.put("/admin/tenants/team", json={"parent": "org"}, headers=LEAD)
    assert made.status == 201
    cycle = await client.patch("/admin/tenants/org", data='{"parent": "team"}', headers=merge)
    await expect_error(cycle, 400, "invalid_request_error")
    assert (await client.put("/admin/tenants/other", json={}, headers=ADMIN)).status == 201
    for parent in ("other", None, "org"):  # moved, made a root, moved back
        body = json.dumps({"parent": parent})
        answer = await client.patch("/admin/tenants/team", data=body, headers=merge)
        assert answer.status == 200, await answer.text()

    team = list(reversed((await audit(client, "?target=team"))["data"]))
    assert [(e["actor"], e["action"]) for e in team] == [
        ("lead", "tenant.create"),
        ("admin", "tenant.update"),
        ("admin", "tenant.update"),
        ("admin", "tenant.update"),
    ]
    shown = [[show_change(FieldChange(**c)) for c in e["changes"]] for e in team]
    assert shown == [
        ['parent: (unset) → "org"'],
        ['parent: "org" → "other"'],
        ['parent: "other" → (unset)'],
        ['parent: (unset) → "org"'],
    ]
    org = (await audit(client, "?target=org"))["data"]
    assert [e["action"] for e in org] == ["tenant.create"]  # the refused cycle: no entry


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?since=yesterday", "since: not a time"),
        ("?cursor=abc", "cursor: not an audit entry id"),
        ("?limit=0", "limit: must be between 1 and 1000"),
    ],
)
async def test_bad_audit_queries_are_400s(client: TestClient, query: str, message: str) -> None:
    answer = await client.get(f"/admin/audit{query}", headers=ADMIN)
    await expect_error(answer, 400, "invalid_request_error")
    assert message in (await answer.json())["error"]["message"]


async def test_the_log_is_bounded_by_count_and_age(redis: Redis) -> None:
    log = AuditLog(redis, prefix="bounded", retention_days=1, max_entries=100)
    actor = Actor("ops")
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    for i in range(300):
        await log.record(actor, "tenant.update", f"t{i}", now_ms=now_ms)
    assert await redis.xlen("bounded:{audit}:log") == 100
    newest = (await log.read(limit=1)).data[0]
    assert newest.target == "t299"
    # two days later: everything older than a day goes before the new entry is added
    await log.record(actor, "tenant.update", "late", now_ms=now_ms + 2 * 86_400_000)
    assert [e.target for e in (await log.read()).data] == ["late"]
