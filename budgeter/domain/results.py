"""Result objects in the Message Batches results shape, and Anthropic error bodies."""

from __future__ import annotations

from typing import Any

BUDGET_ERROR_TYPE = "budget_exhausted_error"
# Anthropic's error type for each HTTP status it answers with; any other status: api_error.
STATUS_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
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
