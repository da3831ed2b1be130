"""Result objects in the Message Batches results shape, and Anthropic error bodies."""

from __future__ import annotations

from typing import Any

BUDGET_ERROR_TYPE = "budget_exhausted_error"
# refusals that are not about a budget: (HTTP status on the proxy, error type)
REFUSAL_TYPES: dict[str, tuple[int, str]] = {
    "model_not_allowed": (403, "permission_error"),
    "unpriced_model": (400, "invalid_request_error"),
}


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """Anthropic's error body ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def succeeded(message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "succeeded", "message": message}


def errored(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` is an Anthropic error body (the upstream's own when it sent one)."""
    return {"type": "errored", "error": body}


def canceled() -> dict[str, Any]:
    return {"type": "canceled"}


def expired(reason: str = "") -> dict[str, Any]:
    """Anthropic's expired result; budgeter adds why (an extra field the SDKs keep)."""
    return {"type": "expired", "reason": reason} if reason else {"type": "expired"}
