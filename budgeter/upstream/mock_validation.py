"""The strict mock's rules: headers and body fields checked as the real Messages API does.

The real API validates a request with pydantic and answers the first problem as
``400 invalid_request_error`` with ``"<field path>: <pydantic message>"`` (e.g.
``context_management: Extra inputs are not permitted``, ``max_tokens: Field required``).
A field that exists only behind a beta is unknown (an extra input) unless the request
carries one of that beta's ``anthropic-beta`` values. ``budgeter mock-upstream --lenient``
(``MockConfig.strict = False``) skips everything here but the authentication rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

Route = Literal["messages", "count_tokens"]

# A beta-only field -> the anthropic-beta value prefixes that unlock it (dated versions
# change; the family stays): context-management-2025-06-27, mcp-client-2025-04-04 /
# mcp-client-2025-11-20, code-execution-2025-05-22 / skills-2025-10-02, ...
BETA_FIELDS: dict[str, tuple[str, ...]] = {
    "context_management": ("context-management-",),
    "mcp_servers": ("mcp-client-",),
    "container": ("code-execution-", "skills-"),
    "output_format": ("structured-outputs-",),
}
_BETA_ROUTES: dict[str, frozenset[Route]] = {
    "context_management": frozenset({"messages", "count_tokens"}),
    "mcp_servers": frozenset({"messages", "count_tokens"}),
    "container": frozenset({"messages"}),
    "output_format": frozenset({"messages", "count_tokens"}),
}
_MESSAGE_KEYS = frozenset({"role", "content"})
# a "system" message inside messages (Claude Code sends one) needs this beta
MID_CONVERSATION_SYSTEM = "mid-conversation-system-"


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str | None = Field(default=None, max_length=256)


class _CountTokensBody(BaseModel):
    """``POST /v1/messages/count_tokens``: the GA fields, then the beta-only ones."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)
    messages: list[dict[str, JsonValue]]
    system: str | list[dict[str, JsonValue]] | None = None
    tools: list[dict[str, JsonValue]] | None = None
    tool_choice: dict[str, JsonValue] | None = None
    thinking: dict[str, JsonValue] | None = None
    output_config: dict[str, JsonValue] | None = None
    cache_control: dict[str, JsonValue] | None = None
    speed: Literal["standard", "fast"] | None = None
    # beta-only (BETA_FIELDS)
    context_management: dict[str, JsonValue] | None = None
    mcp_servers: list[dict[str, JsonValue]] | None = None
    output_format: dict[str, JsonValue] | None = None


class _MessagesBody(_CountTokensBody):
    """``POST /v1/messages``: what count_tokens takes, plus the generation fields."""

    max_tokens: int = Field(ge=1)
    metadata: _Metadata | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    # beta-only (BETA_FIELDS)
    container: str | dict[str, JsonValue] | None = None


_MODELS: dict[Route, type[_CountTokensBody]] = {
    "messages": _MessagesBody,
    "count_tokens": _CountTokensBody,
}


def parse_betas(values: Iterable[str]) -> list[str]:
    """The betas of every ``anthropic-beta`` header (comma lists), in order, without blanks."""
    return [beta.strip() for value in values for beta in value.split(",") if beta.strip()]


def _unlocked(field: str, betas: Iterable[str]) -> bool:
    return any(beta.startswith(BETA_FIELDS[field]) for beta in betas)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def body_problem(route: Route, body: Mapping[str, object], betas: Iterable[str]) -> str | None:
    """The real API's message for the first problem of ``body`` on ``route``, else None."""
    betas = list(betas)
    for name in body:
        if name in BETA_FIELDS and (route not in _BETA_ROUTES[name] or not _unlocked(name, betas)):
            return f"{name}: Extra inputs are not permitted"
    try:
        _MODELS[route].model_validate(dict(body))
    except ValidationError as exc:
        return _first_error(exc)
    messages = body.get("messages")
    system_ok = any(beta.startswith(MID_CONVERSATION_SYSTEM) for beta in betas)
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict):
            continue
        if extra := sorted(set(message) - _MESSAGE_KEYS):
            return f"messages.{i}.{extra[0]}: Extra inputs are not permitted"
        if message.get("role") == "system" and not system_ok:
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    return None


def content_type_problem(method: str, content_type: str) -> str | None:
    """A POST must say its body is JSON (``content-type: application/json``)."""
    if method == "POST" and content_type != "application/json":
        return f"content-type: must be application/json, got {content_type or 'none'!r}"
    return None


def credential(headers: Mapping[str, str]) -> str | None:
    """The API key a request carries: ``x-api-key``, else ``Authorization: Bearer``."""
    if (key := headers.get("x-api-key")) is not None:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
