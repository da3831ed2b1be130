"""OpenAPI 3.1 document of the HTTP API: the operations of the route table
(:data:`budgeter.api.routes.ROUTES`), their bodies generated from the pydantic models."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from budgeter.api import schemas as m
from budgeter.api.route_types import Doc, JsonSchema, Route
from budgeter.api.routes import ROUTES
from budgeter.domain.key_limits import NewKey
from budgeter.domain.messages import MessageParams
from budgeter.domain.policy import TENANT_ID_RE, GlobalPolicy, TenantPolicy
from budgeter.domain.results import STATUS_ERROR_TYPES
from budgeter.ledger.read import LedgerPage
from budgeter.tenants.audit import AuditPage
from budgeter.tenants.rollups import MinutesAnswer

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
    m.TenantWritten,
    m.TenantList,
    m.KeyCreated,
    m.KeyList,
    m.UsageAnswer,
    m.GlobalPolicyAnswer,
    m.StatusAnswer,
    TenantPolicy,
    GlobalPolicy,
    AuditPage,
    NewKey,
    LedgerPage,
    MinutesAnswer,
)

_ERRORS = {
    str(status): STATUS_ERROR_TYPES[status] for status in (400, 401, 403, 404, 413, 429, 500)
}

_SECURITY: dict[str, list[JsonSchema]] = {
    "tenant": [{"apiKey": []}, {"bearerKey": []}],
    "admin": [{"adminToken": []}],
    "public": [],
}

# path parameters whose format the API checks (anything else is refused with 400)
_PATH_SCHEMAS: dict[str, JsonSchema] = {
    "tenant": {"type": "string", "pattern": TENANT_ID_RE.pattern},
}
_QUERY_SCHEMAS: dict[str, JsonSchema] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
}


def _ref(model: type[BaseModel]) -> JsonSchema:
    return {"$ref": REF.format(model=model.__name__)}


def _answer(doc: Doc) -> JsonSchema:
    if doc.answer is None:
        return {"description": doc.description}
    schema = doc.answer if isinstance(doc.answer, dict) else _ref(doc.answer)
    alternatives = {kind: {"schema": other} for kind, other in doc.alternatives.items()}
    answer: JsonSchema = {
        "description": doc.description,
        "content": {doc.content_type: {"schema": schema}, **alternatives},
    }
    if doc.answer_headers:
        answer["headers"] = {
            name: {"description": description, "schema": {"type": "string"}}
            for name, description in doc.answer_headers
        }
    return answer


def _parameters(route: Route) -> list[JsonSchema]:
    in_path = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": _PATH_SCHEMAS.get(name, {"type": "string"}),
        }
        for name in route.path_params
    ]
    in_query = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": _QUERY_SCHEMAS.get(name, {"type": kind}),
        }
        for name, kind in route.doc.query
    ]
    in_header = [
        {
            "name": name,
            "in": "header",
            "required": False,
            "description": description,
            "schema": {"type": "string"},
        }
        for name, description in route.doc.headers
    ]
    return in_path + in_query + in_header


def _operation(route: Route) -> JsonSchema:
    doc = route.doc
    public = doc.security == "public"
    responses: dict[str, JsonSchema] = {}
    if not public:  # the public routes answer no error body of their own
        responses = {
            code: {
                "description": kind,
                "content": {"application/json": {"schema": _ref(m.ErrorResponse)}},
            }
            for code, kind in _ERRORS.items()
        }
    responses[doc.status] = _answer(doc)
    for code in doc.also:
        responses[code] = responses[doc.status]
    responses.update(doc.responses)
    operation: JsonSchema = {
        "summary": doc.summary,
        "tags": [doc.tag],
        "security": list(_SECURITY[doc.security]),
        "responses": responses,
    }
    if not public:
        operation["parameters"] = _parameters(route)
    if doc.body is not None:
        body = doc.body if isinstance(doc.body, dict) else _ref(doc.body)
        operation["requestBody"] = {
            "required": doc.body_required,
            "content": {kind: {"schema": body} for kind in doc.body_types},
        }
    return operation


def document_of(routes: Iterable[Route]) -> JsonSchema:
    """The OpenAPI document of ``routes``."""
    _, schemas = models_json_schema([(model, "validation") for model in _MODELS], ref_template=REF)
    paths: dict[str, dict[str, JsonSchema]] = {}
    for route in routes:
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = _operation(route)
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


@cache
def openapi_document() -> JsonSchema:
    """The document of the API's route table (built once)."""
    return document_of(ROUTES)
