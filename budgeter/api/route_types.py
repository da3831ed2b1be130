"""The types of the route table (budgeter/api/routes.py): a route's method, path and
handler, and the :class:`Doc` of what ``/openapi.json`` says about it, with the small
schema helpers the table uses."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel

from budgeter.api.errors import Handler

JsonSchema: TypeAlias = dict[str, Any]
"""A JSON Schema (or a piece of the OpenAPI document): JSON of any shape."""

Method: TypeAlias = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
Security: TypeAlias = Literal["tenant", "admin", "public"]

_PATTERN = re.compile(r"\{(\w+)(?::[^}]*)?\}")  # {name} or {name:regex} in an aiohttp path


@dataclass(frozen=True)
class Doc:
    """What the OpenAPI document says about one operation."""

    summary: str
    tag: str
    security: Security
    answer: type[BaseModel] | JsonSchema | None = None  # None: no body documented
    description: str = "OK"
    body: type[BaseModel] | JsonSchema | None = None
    body_types: tuple[str, ...] = ("application/json",)  # content types the body may have
    body_required: bool = True
    query: tuple[tuple[str, str], ...] = ()  # (name, JSON type) of optional parameters
    headers: tuple[tuple[str, str], ...] = ()  # (name, description) of optional headers
    answer_headers: tuple[tuple[str, str], ...] = ()  # (name, description) the answer may carry
    status: str = "200"
    also: tuple[str, ...] = ()  # other statuses answering the same body
    content_type: str = "application/json"
    alternatives: Mapping[str, JsonSchema] = field(default_factory=dict)  # content type: schema
    responses: Mapping[str, JsonSchema] = field(default_factory=dict)  # further statuses


@dataclass(frozen=True)
class Route:
    method: Method
    path: str  # as aiohttp takes it: {name} or {name:regex} parameters
    handler: Handler
    doc: Doc

    @property
    def openapi_path(self) -> str:
        """The path as OpenAPI writes it (and aiohttp's ``resource.canonical``)."""
        return _PATTERN.sub(r"{\1}", self.path)

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(_PATTERN.findall(self.path))


def object_schema(**properties: JsonSchema) -> JsonSchema:
    return {"type": "object", "properties": properties, "required": sorted(properties)}


# one event of a streamed Message (stream: true), as the upstream sends it
SSE_EVENT: JsonSchema = {
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
