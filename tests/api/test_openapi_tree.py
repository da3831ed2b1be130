"""What ``/openapi.json`` says of the organisation tree (issue 17): the 409 of DELETE for
a tenant with children and of PUT/PATCH for a concurrent change, their 400 for a bad
parent, the re-parent ``note`` of PUT/PATCH, and the schema of ``GET /admin/status``,
which a real answer (a tree, a queued batch, decisions) must match."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, get_type_hints

import pytest
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from pydantic import BaseModel
from redis.asyncio import Redis

from budgeter.admission import recent
from budgeter.admission.admission import Admission
from budgeter.api import schemas
from budgeter.api.app import create_app
from budgeter.api.appkeys import TENANTS
from budgeter.api.openapi import openapi_document
from budgeter.settings import Settings
from budgeter.tenants import status
from budgeter.tenants.store import PolicyConflictError
from tests.api.test_app import expect_error, request_line

ADMIN = {"authorization": "Bearer admin-secret"}
MERGE = {**ADMIN, "content-type": "application/merge-patch+json"}
TENANT = "/admin/tenants/{tenant}"


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    settings = Settings(
        redis_url=redis_url,
        admin_token="admin-secret",  # type: ignore[arg-type]
        upstream_url="http://127.0.0.1:9",  # never reached
        auth_failures_per_minute=1_000_000,
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        yield test_client


def response_schema(path: str, method: str, status_code: str) -> dict[str, Any]:
    responses = openapi_document()["paths"][path][method]["responses"]
    assert status_code in responses, f"{method} {path}: {status_code} undocumented"
    return dict(responses[status_code]["content"]["application/json"]["schema"])


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` references resolve."""
    root = {**schema, "components": openapi_document()["components"]}
    return Draft202012Validator(root)


def assert_documented(answer: Any, path: str, method: str, status_code: str) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(response_schema(path, method, status_code)).iter_errors(answer)
    ]
    assert not errors, errors


# the document ---------------------------------------------------------------------------


def test_delete_put_and_patch_document_their_409_and_400() -> None:
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    paths = openapi_document()["paths"][TENANT]
    assert response_schema(TENANT, "delete", "409") == error
    assert "has children" in paths["delete"]["responses"]["409"]["description"]
    for method in ("put", "patch"):
        assert response_schema(TENANT, method, "409") == error
        assert "kept changing" in paths[method]["responses"]["409"]["description"]
        assert response_schema(TENANT, method, "400") == error
        assert "cycle" in paths[method]["responses"]["400"]["description"]


def test_put_and_patch_answers_document_the_reparent_note() -> None:
    written = {"$ref": "#/components/schemas/TenantWritten"}
    for method, code in (("put", "200"), ("put", "201"), ("patch", "200")):
        assert response_schema(TENANT, method, code) == written
    note = openapi_document()["components"]["schemas"]["TenantWritten"]["properties"]["note"]
    assert "only charges from now on" in note["description"]
    # GET carries no note: its answer stays TenantAnswer
    assert response_schema(TENANT, "get", "200") == {"$ref": "#/components/schemas/TenantAnswer"}


_STATUS_PAIRS: list[tuple[type[BaseModel], Any]] = [
    (schemas.StatusAnswer, status.StatusSnapshot),
    (schemas.StatusTenant, status.TenantStatus),
    (schemas.StatusRateBucket, status.RateBucket),
    (schemas.StatusBatch, status.BatchProgress),
    (schemas.StatusDecision, recent.RecentDecision),
    (schemas.StatusDecisionGroup, status.DecisionGroup),
    (schemas.StatusSubtreeToday, status.SubtreeToday),
    (schemas.StatusScheduler, status.SchedulerStatus),
    (schemas.StatusParked, status.ParkedTenant),
]


@pytest.mark.parametrize(
    ("model", "typed"), _STATUS_PAIRS, ids=[m.__name__ for m, _ in _STATUS_PAIRS]
)
def test_the_status_schema_has_the_fields_of_the_snapshot(
    model: type[BaseModel], typed: Any
) -> None:
    """budgeter/tenants/status.py's TypedDicts are what the handler answers; the documented
    models must name the same fields (a field added to one and not the other fails here)."""
    assert set(model.model_fields) == set(get_type_hints(typed))


def test_admin_status_is_documented_with_the_tree_fields() -> None:
    assert response_schema("/admin/status", "get", "200") == {
        "$ref": "#/components/schemas/StatusAnswer"
    }
    components = openapi_document()["components"]["schemas"]
    assert {"now_ms", "tenants", "roots", "idle", "scheduler"} <= set(
        components["StatusAnswer"]["required"]
    )
    tenant = components["StatusTenant"]
    tree = {"parent", "children", "depth", "subtree_idle", "subtree_today"}
    assert tree <= set(tenant["properties"]) and tree <= set(tenant["required"])


# real answers ----------------------------------------------------------------------------


async def test_a_real_admin_status_answer_matches_its_schema(
    client: TestClient, redis: Redis
) -> None:
    for tenant, policy in (
        ("org", {"budgets": {"day": 100000}}),
        ("team", {"parent": "org", "rate": {"rpm": 1, "itpm": 1000}}),
        ("idle-one", {}),
    ):
        resp = await client.put(f"/admin/tenants/{tenant}", json=policy, headers=ADMIN)
        assert resp.status == 201, await resp.text()
    key = (await (await client.post("/admin/tenants/team/keys", headers=ADMIN)).json())["key"]
    resp = await client.post(
        "/v1/messages/batches", json={"requests": [request_line("a")]}, headers={"x-api-key": key}
    )
    assert resp.status == 200, await resp.text()
    admission = Admission(redis)
    assert (await admission.reserve("team", "r1", 10, 10)).kind == "ADMIT"
    assert (await admission.reserve("team", "r2", 10, 10)).kind == "DEFER"
    resp = await client.get("/admin/status", headers=ADMIN)
    assert resp.status == 200
    snapshot = await resp.json()
    assert_documented(snapshot, "/admin/status", "get", "200")
    rows = {row["tenant"]: row for row in snapshot["tenants"]}
    assert rows["team"]["parent"] == "org" and rows["org"]["children"] == ["team"]
    assert rows["org"]["subtree_today"] is not None and rows["team"]["batches"]
    assert rows["team"]["recent"] and rows["team"]["rates"]
    # the schema is not vacuous: a row without its tree fields does not match it
    del snapshot["tenants"][0]["depth"]
    assert not validator(response_schema("/admin/status", "get", "200")).is_valid(snapshot)


async def test_a_reparent_answer_matches_its_schema_and_the_409s_are_documented(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for tenant, policy in (("org", {}), ("org2", {}), ("team", {"parent": "org"})):
        resp = await client.put(f"/admin/tenants/{tenant}", json=policy, headers=ADMIN)
        assert resp.status == 201
        assert_documented(await resp.json(), TENANT, "put", "201")
    resp = await client.put("/admin/tenants/team", json={"parent": "org2"}, headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 200 and "only charges from now on" in answer["note"]
    assert_documented(answer, TENANT, "put", "200")
    resp = await client.patch("/admin/tenants/team", json={"parent": "org"}, headers=MERGE)
    answer = await resp.json()
    assert resp.status == 200 and answer["note"].startswith("moved from 'org2' to 'org'")
    assert_documented(answer, TENANT, "patch", "200")

    # a bad parent: 400, documented
    resp = await client.patch("/admin/tenants/org", json={"parent": "team"}, headers=MERGE)
    assert "cycle" in await expect_error(resp, 400, "invalid_request_error")
    # a tenant with children: 409 naming them, documented
    resp = await client.delete("/admin/tenants/org", headers=ADMIN)
    assert "'team'" in await expect_error(resp, 409, "invalid_request_error")
    assert_documented(await resp.json(), TENANT, "delete", "409")

    # the tree changing under every attempt: 409 on DELETE too (it was a 500)
    async def conflict(_tenant: str) -> bool:
        raise PolicyConflictError("the organisation tree kept changing; try again")

    monkeypatch.setattr(client.app[TENANTS], "delete", conflict)
    resp = await client.delete("/admin/tenants/org2", headers=ADMIN)
    assert "kept changing" in await expect_error(resp, 409, "invalid_request_error")
