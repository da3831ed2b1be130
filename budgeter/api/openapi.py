"""OpenAPI 3.1 document of the HTTP API, generated from the pydantic models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from budgeter.api import schemas as m
from budgeter.domain.messages import MessageParams
from budgeter.domain.policy import TENANT_ID_RE, GlobalPolicy, TenantPolicy

REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    MessageParams,
    m.MessageAnswer,
    m.CountTokensBody,
    m.CountTokensAnswer,
    m.CreateBatchBody,
    m.MessageBatch,
    m.MessageBatchList,
    m.DeletedMessageBatch,
    m.ErrorResponse,
    m.TenantAnswer,
    m.TenantList,
    m.KeyCreated,
    m.KeyList,
    m.UsageAnswer,
    m.GlobalPolicyAnswer,
    TenantPolicy,
    GlobalPolicy,
)

_ERRORS = {
    "400": "invalid_request_error",
    "401": "authentication_error",
    "403": "permission_error",
    "404": "not_found_error",
    "413": "request_too_large",
    "429": "rate_limit_error",
    "500": "api_error",
}


# path parameters whose format the API checks (anything else is refused with 400)
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "tenant": {"type": "string", "pattern": TENANT_ID_RE.pattern},
}
_QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
}


# one event of a streamed Message (stream: true), as the upstream sends it
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "description": "message_start, content_block_delta, ..."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string"}},
            },
        },
    },
}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF.format(model=model.__name__)}


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": sorted(properties)}


def _op(
    summary: str,
    answer: type[BaseModel] | dict[str, Any] | None,
    *,
    tag: str,
    security: str,
    body: type[BaseModel] | None = None,
    params: list[str] = (),  # type: ignore[assignment]
    query: list[tuple[str, str]] = (),  # type: ignore[assignment]
    status: str = "200",
    also: tuple[str, ...] = (),
    content_type: str = "application/json",
    alternatives: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        code: {
            "description": kind,
            "content": {"application/json": {"schema": _ref(m.ErrorResponse)}},
        }
        for code, kind in _ERRORS.items()
    }
    if answer is None:
        responses[status] = {
            "description": "JSON Lines, one result per request",
            "content": {content_type: {"schema": {"type": "string"}}},
        }
    else:
        schema = answer if isinstance(answer, dict) else _ref(answer)
        responses[status] = {
            "description": "OK",
            "content": {content_type: {"schema": schema}, **(alternatives or {})},
        }
    for code in also:
        responses[code] = responses[status]
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "security": [{security: []}] if security != "admin" else [{"adminToken": []}],
        "responses": responses,
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": _PATH_SCHEMAS.get(name, {"type": "string"}),
            }
            for name in params
        ]
        + [
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": _QUERY_SCHEMAS.get(name, {"type": kind}),
            }
            for name, kind in query
        ],
    }
    if security == "tenant":
        op["security"] = [{"apiKey": []}, {"bearerKey": []}]
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return op


@cache
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema([(model, "validation") for model in _MODELS], ref_template=REF)
    batch = ["batch_id"]
    tenant = ["tenant"]
    paths: dict[str, Any] = {
        "/v1/messages": {
            "post": _op(
                "Create a message through admission (stream: true answers text/event-stream)",
                m.MessageAnswer,
                tag="messages",
                security="tenant",
                body=MessageParams,
                alternatives={"text/event-stream": {"schema": _SSE_EVENT}},
            ),
        },
        "/v1/messages/count_tokens": {
            "post": _op(
                "Count a payload's input tokens",
                m.CountTokensAnswer,
                tag="messages",
                security="tenant",
                body=m.CountTokensBody,
            ),
        },
        "/v1/messages/batches": {
            "post": _op(
                "Create a Message Batch",
                m.MessageBatch,
                tag="batches",
                security="tenant",
                body=m.CreateBatchBody,
            ),
            "get": _op(
                "List Message Batches (newest first)",
                m.MessageBatchList,
                tag="batches",
                security="tenant",
                query=[("limit", "integer"), ("before_id", "string"), ("after_id", "string")],
            ),
        },
        "/v1/messages/batches/{batch_id}": {
            "get": _op(
                "Retrieve a Message Batch",
                m.MessageBatch,
                tag="batches",
                security="tenant",
                params=batch,
            ),
            "delete": _op(
                "Delete an ended Message Batch",
                m.DeletedMessageBatch,
                tag="batches",
                security="tenant",
                params=batch,
            ),
        },
        "/v1/messages/batches/{batch_id}/cancel": {
            "post": _op(
                "Cancel a Message Batch",
                m.MessageBatch,
                tag="batches",
                security="tenant",
                params=batch,
            ),
        },
        "/v1/messages/batches/{batch_id}/results": {
            "get": _op(
                "Stream a Message Batch's results",
                None,
                tag="batches",
                security="tenant",
                params=batch,
                content_type="application/x-jsonl",
            ),
        },
        "/admin/tenants": {"get": _op("List tenants", m.TenantList, tag="admin", security="admin")},
        "/admin/tenants/{tenant}": {
            "put": _op(
                "Create or replace a tenant's policy",
                m.TenantAnswer,
                tag="admin",
                security="admin",
                params=tenant,
                body=TenantPolicy,
                also=("201",),
            ),
            "get": _op(
                "Read a tenant's policy",
                m.TenantAnswer,
                tag="admin",
                security="admin",
                params=tenant,
            ),
            "delete": _op(
                "Delete a tenant (and revoke its keys)",
                _object(tenant={"type": "string"}, deleted={"type": "boolean"}),
                tag="admin",
                security="admin",
                params=tenant,
            ),
        },
        "/admin/tenants/{tenant}/keys": {
            "post": _op(
                "Create a tenant API key (shown once)",
                m.KeyCreated,
                tag="admin",
                security="admin",
                params=tenant,
                status="201",
            ),
            "get": _op(
                "List a tenant's keys (never the keys themselves)",
                m.KeyList,
                tag="admin",
                security="admin",
                params=tenant,
            ),
        },
        "/admin/tenants/{tenant}/keys/{key_id}": {
            "delete": _op(
                "Revoke a key",
                _object(id={"type": "string"}, revoked={"type": "boolean"}),
                tag="admin",
                security="admin",
                params=["tenant", "key_id"],
            ),
        },
        "/v1/usage": {
            "get": _op(
                "The calling tenant's own budgets and usage per period and model",
                m.UsageAnswer,
                tag="usage",
                security="tenant",
            ),
        },
        "/admin/tenants/{tenant}/usage": {
            "get": _op(
                "Budgets and usage per period and model",
                m.UsageAnswer,
                tag="admin",
                security="admin",
                params=tenant,
            ),
        },
        "/admin/status": {
            "get": _op(
                "Every tenant's budgets, queue, inflight and recent decisions",
                {"type": "object"},
                tag="admin",
                security="admin",
            ),
        },
        "/admin/global-policy": {
            "get": _op(
                "Read the upstream account's policy",
                m.GlobalPolicyAnswer,
                tag="admin",
                security="admin",
            ),
            "put": _op(
                "Replace the upstream account's policy",
                m.GlobalPolicyAnswer,
                tag="admin",
                security="admin",
                body=GlobalPolicy,
            ),
        },
    }
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        paths[path] = {
            "get": {
                "summary": path.strip("/"),
                "tags": ["operations"],
                "security": [],
                "responses": {"200": {"description": "OK"}},
            }
        }
    paths["/readyz"]["get"]["responses"]["503"] = {
        "description": "Redis or the upstream is not reachable",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    paths["/"] = {
        "get": {
            "summary": "Status page (HTML; asks for the admin token in the browser)",
            "tags": ["operations"],
            "security": [],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "budgeter",
            "version": "0.1.0",
            "description": "Message Batches API with per-tenant token budgets.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearerKey": {"type": "http", "scheme": "bearer"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
        },
    }
