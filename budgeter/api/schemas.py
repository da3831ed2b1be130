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


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def ok(model: BaseModel, status: int = 200) -> web.Response:
    """A JSON answer made of one of the models above."""
    return web.json_response(dump(model), status=status, dumps=jsonio.dumps_str)
