"""The one route table of the API: each route's method, path and handler, and what
``/openapi.json`` says about it. ``create_app`` registers exactly these routes and
:func:`budgeter.api.openapi.openapi_document` documents exactly these routes."""

from __future__ import annotations

from aiohttp import web

from budgeter.api import (
    admin,
    batches,
    health,
    ledger_routes,
    models,
    proxy,
    schemas,
    usage_minutes,
)
from budgeter.api.route_types import (
    SSE_EVENT,
    Doc,
    JsonSchema,
    Route,
    object_schema,
)
from budgeter.api.status_page import status_page
from budgeter.domain.key_limits import NewKey
from budgeter.domain.messages import MessageParams
from budgeter.domain.policy import GlobalPolicy, TenantPolicy
from budgeter.ledger.read import LedgerPage
from budgeter.tenants.audit import AuditPage
from budgeter.tenants.rollups import MinutesAnswer

OPENAPI = web.AppKey[JsonSchema]("openapi")  # the document served by GET /openapi.json

LEDGER_QUERY: tuple[tuple[str, str], ...] = (
    ("since", "string"),
    ("until", "string"),
    ("model", "string"),
    ("tag", "string"),
    ("cursor", "string"),
    ("limit", "integer"),
)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def _error_answer(description: str) -> JsonSchema:
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# what PUT, PATCH and DELETE /admin/tenants/{tenant} answer besides 200 (budgeter/api/admin.py)
_BAD_PARENT = _error_answer(
    "invalid_request_error: a body that is not JSON or not a valid policy, or a parent "
    "that would break the organisation tree (a missing parent, a cycle, more than 4 "
    "levels below a root), the message naming the chain; nothing stored"
)
_TREE_CONFLICT = _error_answer(
    "invalid_request_error: the organisation tree (or, for PATCH, the policy) kept "
    "changing under the write (concurrent admin writes); nothing stored, try again"
)
_HAS_CHILDREN = _error_answer(
    "invalid_request_error: the tenant has children, named in the message (delete them or "
    "give them another parent first), or the tree kept changing; nothing deleted"
)

# the body of PATCH /admin/tenants/{tenant}: any member of the policy, null deleting it
TENANT_POLICY_PATCH: JsonSchema = {
    "type": "object",
    "description": "A JSON merge patch (RFC 7396) of the stored TenantPolicy: null deletes a "
    "field, objects merge recursively, anything else replaces. The merged policy is "
    "validated whole (400 naming the bad field; nothing stored).",
    "propertyNames": {"enum": sorted(TenantPolicy.model_fields)},
}

BATCH = "/v1/messages/batches/{batch_id}"
# the headers a call to the upstream carries through (issue 16): budgeter's own count uses them too
_PASSED_THROUGH = (
    (
        "anthropic-beta",
        "beta features, comma-separated: sent upstream with the call "
        "(BUDGETER_ALLOWED_BETAS and the policy's allowed_betas may refuse one: 400)",
    ),
    ("anthropic-version", "sent upstream when BUDGETER_UPSTREAM_ANTHROPIC_VERSION=client"),
)
_TAGS_HEADER = (
    "budgeter-tags",
    "up to 8 tags key=value,... for the ledger (keys ^[a-z][a-z0-9_]{0,31}$, values at "
    "most 128 characters; metadata.user_id is tag user); a bad tag: 400 naming it",
)
_BATCH_HEADERS = (
    *_PASSED_THROUGH,
    ("budgeter-priority", "high, normal or low: order among the tenant's own jobs"),
    ("budgeter-deadline-seconds", "jobs not served by then expire"),
    _TAGS_HEADER,
)

# {tenant:[^/]+}: braces too reach tenant_param, which refuses them with a clear 400
TENANT = "/admin/tenants/{tenant:[^/]+}"

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/messages",
        proxy.create_message,
        Doc(
            "Create a message through admission (stream: true answers text/event-stream)",
            "messages",
            "tenant",
            answer=schemas.MessageAnswer,
            body=MessageParams,
            alternatives={"text/event-stream": SSE_EVENT},
            headers=(*_PASSED_THROUGH, _TAGS_HEADER),
            answer_headers=(
                (
                    "budgeter-fallback-model",
                    "the model that served the request, when a budget could not hold the "
                    "model asked for and the tenant's fallback_models named this one",
                ),
            ),
        ),
    ),
    Route(
        "POST",
        "/v1/messages/count_tokens",
        proxy.count_tokens,
        Doc(
            "Count a payload's input tokens",
            "messages",
            "tenant",
            answer=schemas.CountTokensAnswer,
            body=schemas.CountTokensBody,
            headers=_PASSED_THROUGH,
        ),
    ),
    Route(
        "GET",
        "/v1/models",
        models.list_models,
        Doc(
            "List the models this tenant may use (newest first)",
            "models",
            "tenant",
            answer=models.MODEL_LIST_SCHEMA,
            query=(("limit", "integer"), ("before_id", "string"), ("after_id", "string")),
        ),
    ),
    Route(
        "GET",
        "/v1/models/{model_id}",
        models.get_model,
        Doc("Retrieve a model this tenant may use", "models", "tenant", answer=models.MODEL_SCHEMA),
    ),
    Route(
        "POST",
        "/v1/messages/batches",
        batches.create_batch,
        Doc(
            "Create a Message Batch",
            "batches",
            "tenant",
            answer=schemas.MessageBatch,
            body=schemas.CreateBatchBody,
            headers=_BATCH_HEADERS,
        ),
    ),
    Route(
        "GET",
        "/v1/messages/batches",
        batches.list_batches,
        Doc(
            "List Message Batches (newest first)",
            "batches",
            "tenant",
            answer=schemas.MessageBatchList,
            query=(("limit", "integer"), ("before_id", "string"), ("after_id", "string")),
        ),
    ),
    Route(
        "GET",
        BATCH,
        batches.get_batch,
        Doc("Retrieve a Message Batch", "batches", "tenant", answer=schemas.MessageBatch),
    ),
    Route(
        "DELETE",
        BATCH,
        batches.delete_batch,
        Doc(
            "Delete an ended Message Batch", "batches", "tenant", answer=schemas.DeletedMessageBatch
        ),
    ),
    Route(
        "POST",
        f"{BATCH}/cancel",
        batches.cancel_batch,
        Doc("Cancel a Message Batch", "batches", "tenant", answer=schemas.MessageBatch),
    ),
    Route(
        "GET",
        f"{BATCH}/results",
        batches.batch_results,
        Doc(
            "Stream a Message Batch's results",
            "batches",
            "tenant",
            answer={"type": "string"},
            description="JSON Lines, one result per request",
            content_type="application/x-jsonl",
        ),
    ),
    Route(
        "GET",
        "/admin/tenants",
        admin.list_tenants,
        Doc("List tenants", "admin", "admin", answer=schemas.TenantList),
    ),
    Route(
        "PUT",
        TENANT,
        admin.put_tenant,
        Doc(
            "Create or replace a tenant's policy",
            "admin",
            "admin",
            answer=schemas.TenantWritten,
            body=TenantPolicy,
            also=("201",),
            responses={"400": _BAD_PARENT, "409": _TREE_CONFLICT},
        ),
    ),
    Route(
        "PATCH",
        TENANT,
        admin.patch_tenant,
        Doc(
            "Change a tenant's policy with a JSON merge patch (RFC 7396)",
            "admin",
            "admin",
            answer=schemas.TenantWritten,
            body=TENANT_POLICY_PATCH,
            body_types=admin.PATCH_TYPES,
            responses={
                "400": _BAD_PARENT,
                "409": _TREE_CONFLICT,
                "415": _error_answer("content-type is not a JSON merge patch"),
            },
        ),
    ),
    Route(
        "GET",
        TENANT,
        admin.get_tenant,
        Doc("Read a tenant's policy", "admin", "admin", answer=schemas.TenantAnswer),
    ),
    Route(
        "DELETE",
        TENANT,
        admin.delete_tenant,
        Doc(
            "Delete a tenant (and revoke its keys)",
            "admin",
            "admin",
            answer=object_schema(tenant={"type": "string"}, deleted={"type": "boolean"}),
            responses={"409": _HAS_CHILDREN},
        ),
    ),
    Route(
        "POST",
        f"{TENANT}/keys",
        admin.create_key,
        Doc(
            "Create a tenant API key (shown once), with an optional name and limits of its "
            "own (they only narrow the tenant's: both scopes must hold)",
            "admin",
            "admin",
            answer=schemas.KeyCreated,
            body=NewKey,
            body_required=False,
            status="201",
        ),
    ),
    Route(
        "GET",
        f"{TENANT}/keys",
        admin.list_keys,
        Doc(
            "List a tenant's keys (never the keys themselves)",
            "admin",
            "admin",
            answer=schemas.KeyList,
        ),
    ),
    Route(
        "DELETE",
        f"{TENANT}/keys/{{key_id}}",
        admin.revoke_key,
        Doc(
            "Revoke a key",
            "admin",
            "admin",
            answer=object_schema(id={"type": "string"}, revoked={"type": "boolean"}),
        ),
    ),
    Route(
        "GET",
        "/v1/usage",
        admin.get_own_usage,
        Doc(
            "The calling tenant's own budgets and usage per period and model",
            "usage",
            "tenant",
            answer=schemas.UsageAnswer,
        ),
    ),
    Route(
        "GET",
        f"{TENANT}/usage",
        admin.get_usage,
        Doc("Budgets and usage per period and model", "admin", "admin", answer=schemas.UsageAnswer),
    ),
    Route(
        "GET",
        "/v1/usage/minutes",
        usage_minutes.get_own_minutes,
        Doc(
            "The calling tenant's tokens and USD per minute (kept 48 h), since a time",
            "usage",
            "tenant",
            answer=MinutesAnswer,
            query=(("since", "string"),),
        ),
    ),
    Route(
        "GET",
        "/v1/usage/ledger",
        ledger_routes.get_own_ledger,
        Doc(
            "The calling tenant's per-request ledger, oldest first, filtered, a page at a time",
            "usage",
            "tenant",
            answer=LedgerPage,
            query=LEDGER_QUERY,
        ),
    ),
    Route(
        "GET",
        f"{TENANT}/usage/minutes",
        usage_minutes.get_minutes,
        Doc(
            "A tenant's tokens and USD per minute (kept 48 h), since a time (default 1h)",
            "admin",
            "admin",
            answer=MinutesAnswer,
            query=(("since", "string"),),
        ),
    ),
    Route(
        "GET",
        "/admin/status",
        admin.get_status,
        Doc(
            "Every tenant's budgets, queue, inflight and recent decisions, and the "
            "organisation tree",
            "admin",
            "admin",
            answer=schemas.StatusAnswer,
        ),
    ),
    Route(
        "GET",
        "/admin/global-policy",
        admin.get_global_policy,
        Doc(
            "Read the upstream account's policy",
            "admin",
            "admin",
            answer=schemas.GlobalPolicyAnswer,
        ),
    ),
    Route(
        "PUT",
        "/admin/global-policy",
        admin.put_global_policy,
        Doc(
            "Replace the upstream account's policy",
            "admin",
            "admin",
            answer=schemas.GlobalPolicyAnswer,
            body=GlobalPolicy,
        ),
    ),
    Route(
        "GET",
        "/admin/ledger",
        ledger_routes.get_ledger,
        Doc(
            "A tenant's per-request ledger (?tenant=), oldest first (viewers may read it)",
            "admin",
            "admin",
            answer=LedgerPage,
            query=(("tenant", "string"), *LEDGER_QUERY),
        ),
    ),
    Route(
        "GET",
        "/admin/audit",
        admin.get_audit,
        Doc(
            "The audit log of admin writes, newest first (viewers may read it)",
            "admin",
            "admin",
            answer=AuditPage,
            query=(
                ("target", "string"),
                ("actor", "string"),
                ("since", "string"),
                ("cursor", "string"),
                ("limit", "integer"),
            ),
        ),
    ),
    Route("GET", "/healthz", health.healthz, Doc("healthz", "operations", "public")),
    Route(
        "GET",
        "/readyz",
        health.readyz,
        Doc(
            "readyz",
            "operations",
            "public",
            responses={
                "503": {
                    "description": "Redis or the upstream is not reachable",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        ),
    ),
    Route("GET", "/metrics", health.metrics_handler, Doc("metrics", "operations", "public")),
    Route("GET", "/openapi.json", openapi_json, Doc("openapi.json", "operations", "public")),
    Route(
        "GET",
        "/",
        status_page,
        Doc(
            "Status page (HTML; asks for the admin token in the browser)",
            "operations",
            "public",
            answer={"type": "string"},
            content_type="text/html",
        ),
    ),
)


def add_routes(app: web.Application, routes: tuple[Route, ...] = ROUTES) -> None:
    """Register ``routes`` on ``app`` (a GET answers HEAD too)."""
    for route in routes:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)
