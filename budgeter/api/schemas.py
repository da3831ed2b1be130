"""Pydantic models of the HTTP API's answers (and the source of /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from budgeter.admission.admission import format_ms
from budgeter.domain import jsonio
from budgeter.domain.key_limits import KeyLimits
from budgeter.domain.messages import MAX_BATCH_REQUESTS, BatchRequest
from budgeter.domain.policy import GlobalPolicy, TenantPolicy
from budgeter.queue.batches import BatchStatus
from budgeter.tenants.usage import BudgetRow as BudgetRow  # re-exported: in the document
from budgeter.tenants.usage import ChildUsage as ChildUsage
from budgeter.tenants.usage import KeyUsage as KeyUsage
from budgeter.tenants.usage import PeriodTotals as PeriodTotals
from budgeter.tenants.usage import Rollup as Rollup
from budgeter.tenants.usage import UsageAnswer as UsageAnswer
from budgeter.tenants.usage import UsageRow as UsageRow


class ErrorObject(BaseModel):
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorObject


class MessageAnswer(BaseModel):
    """The upstream's Message, passed through unchanged."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]]
    model: str
    stop_reason: str | None = None
    usage: dict[str, Any]


class CountTokensBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class CountTokensAnswer(BaseModel):
    input_tokens: int


class CreateBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[BatchRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class RequestCounts(BaseModel):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(BaseModel):
    id: str
    type: Literal["message_batch"] = "message_batch"
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: RequestCounts
    ended_at: str | None
    created_at: str
    expires_at: str
    archived_at: str | None = None
    cancel_initiated_at: str | None
    results_url: str | None

    @classmethod
    def of(cls, status: BatchStatus, base_url: str) -> MessageBatch:
        def when(ms: int | None) -> str | None:
            return None if ms is None else format_ms(ms, precise=True)

        return cls(
            id=status.id,
            processing_status=status.processing_status,
            request_counts=RequestCounts(
                processing=status.processing,
                succeeded=status.succeeded,
                errored=status.errored,
                canceled=status.canceled,
                expired=status.expired,
            ),
            ended_at=when(status.ended_ms if status.ended else None),
            created_at=format_ms(status.created_ms, precise=True),
            expires_at=format_ms(status.expires_ms, precise=True),
            cancel_initiated_at=when(status.cancel_initiated_ms),
            results_url=(
                f"{base_url}/v1/messages/batches/{status.id}/results" if status.ended else None
            ),
        )


class MessageBatchList(BaseModel):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedMessageBatch(BaseModel):
    id: str
    type: Literal["message_batch_deleted"] = "message_batch_deleted"


class TenantAnswer(BaseModel):
    tenant: str
    policy: TenantPolicy


class TenantWritten(TenantAnswer):
    """What PUT and PATCH ``/admin/tenants/{tenant}`` answer (and ``budgeter tenants set``)."""

    note: str | None = Field(
        default=None,
        description="Only when the change moved the tenant to another parent "
        "(merge_patch.reparent_note): what it was charged so far stays counted where it was; "
        "only charges from now on count toward the new parent. Absent otherwise.",
    )


class TenantList(BaseModel):
    data: list[TenantAnswer]


class KeyCreated(BaseModel):
    id: str
    key: str = Field(description="Shown this once; only its hash is stored.")
    tenant: str
    name: str | None = None
    limits: KeyLimits | None = Field(
        default=None, description="The key's own limits (null: only its tenant's apply)."
    )


class KeyInfo(BaseModel):
    id: str
    name: str | None = None
    created_at_ms: int
    last_used_at_ms: int | None = Field(
        default=None, description="When the key was last used (to the minute); null: never."
    )
    hint: str = Field(description="The key's last 4 characters.")
    limits: KeyLimits | None = Field(
        default=None, description="The key's own limits (null: only its tenant's apply)."
    )
    usage: list[PeriodTotals] | None = Field(
        default=None,
        description="What was charged to this key, per period (null: not read, or nothing "
        "recorded yet).",
    )


class KeyList(BaseModel):
    data: list[KeyInfo]


class GlobalPolicyAnswer(BaseModel):
    policy: GlobalPolicy


# GET /admin/status: the documented shape of budgeter.tenants.status.StatusSnapshot (its
# TypedDicts are what the handler answers; tests/api/test_openapi_tree.py keeps the two
# field for field alike and validates a real answer against this schema)


class StatusRateBucket(BaseModel):
    """One rate limit's bucket (GCRA, one minute of the limit), as reserve.lua stores it."""

    kind: Literal["rpm", "itpm", "otpm"]
    model: str | None = Field(description="Set for a limit of one model.")
    limit: int = Field(description="Per minute.")
    in_use: int = Field(description="Requests or tokens the bucket holds now.")
    remaining: int = Field(description="What fits now.")
    fill: float = Field(ge=0, le=1, description="in_use / limit.")
    full_at_ms: int = Field(description="When the whole limit is available again.")


class StatusBatch(BaseModel):
    """An open batch's progress."""

    id: str
    created_ms: int
    expires_ms: int
    total: int
    succeeded: int
    errored: int
    canceled: int
    expired: int
    processing: int = Field(description="Queued or in flight.")
    canceling: bool
    eta_ms: int | None = Field(description="At the batch's pace so far; null before a result.")


class StatusDecision(BaseModel):
    """One recent admission decision."""

    at_ms: int
    decision: str = Field(description="ADMIT, DEFER or REJECT.")
    reason: str = Field(description="rate:rpm, budget:day, ...; empty for an admission.")
    tokens: int


class StatusDecisionGroup(BaseModel):
    """A run of identical consecutive decisions (same decision and reason)."""

    decision: str
    reason: str
    count: int
    first_at_ms: int
    last_at_ms: int
    tokens: int = Field(description="The sum over the run.")


class StatusSubtreeToday(BaseModel):
    """What a tenant and every tenant below it used today."""

    tenants: int
    requests: int
    tokens: int
    usd: float


class StatusTenant(BaseModel):
    """One tenant's state, with its place in the organisation tree."""

    tenant: str
    policy: str | None = Field(description="The policy's JSON (defaults left out).")
    queued: int
    inflight: int
    oldest_age_s: float = Field(description="Age of its oldest queued job (0: none).")
    budgets: list[BudgetRow]
    usage_today: list[UsageRow] = Field(description="Today's usage per model.")
    recent: list[StatusDecision] = Field(description="Its last decisions, newest first.")
    recent_groups: list[StatusDecisionGroup] = Field(description="The same, in runs.")
    rates: list[StatusRateBucket]
    batches: list[StatusBatch] = Field(description="Its open batches.")
    parked_until_ms: int | None = Field(description="Set while the scheduler parks it.")
    idle: bool = Field(description="No work and no decision for 5 minutes.")
    parent: str | None = Field(description="Its parent in the organisation tree (null: a root).")
    children: list[str] = Field(description="Its direct children, busiest subtree first.")
    depth: int = Field(ge=0, description="Levels below its root (0: a root).")
    subtree_idle: bool = Field(description="It and every tenant below it are idle.")
    subtree_today: StatusSubtreeToday | None = Field(
        description="Set for a tenant with children: it and its subtree, today."
    )
    minutes: list[int] = Field(description="Tokens settled per minute, the last 60.")
    minutes_start_ms: int = Field(description="Start of the first of those minutes.")


class StatusParked(BaseModel):
    tenant: str
    until_ms: int


class StatusScheduler(BaseModel):
    ready: int = Field(description="Tenants ready to be served.")
    parked: list[StatusParked]


class StatusAnswer(BaseModel):
    """GET /admin/status: every tenant's state, for the status page and ``budgeter top``."""

    now_ms: int
    tenants: list[StatusTenant] = Field(description="By activity, the idle ones last.")
    roots: list[str] = Field(
        description="The tree's roots, busiest subtree first, idle subtrees last by name."
    )
    idle: int = Field(description="How many tenants are idle.")
    scheduler: StatusScheduler


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def ok(model: BaseModel, status: int = 200) -> web.Response:
    """A JSON answer made of one of the models above."""
    return web.json_response(dump(model), status=status, dumps=jsonio.dumps_str)
