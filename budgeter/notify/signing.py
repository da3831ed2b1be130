"""Webhook signatures, the scheme Stripe uses: ``budgeter-signature: t=<unix>,v1=<hex>``,
``v1`` the HMAC-SHA256 with ``BUDGETER_WEBHOOK_SECRET`` of ``"<t>.<body>"`` (the raw body
bytes). A receiver recomputes it, compares in constant time and refuses a ``t`` older than
a few minutes (replays)."""

from __future__ import annotations

import hashlib
import hmac

HEADER = "budgeter-signature"
TOLERANCE_S = 300


class BadSignatureError(ValueError):
    """A signature header that does not verify; the message says why."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, *, now: int, tolerance_s: int = TOLERANCE_S
) -> None:
    """Raise :class:`BadSignatureError` unless ``header`` signs ``body`` recently."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        raise BadSignatureError("no t=<unix time> in the signature header") from None
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    if not hmac.compare_digest(parts.get("v1", ""), expected):
        raise BadSignatureError("the v1 signature does not match the body")
    if abs(now - timestamp) > tolerance_s:
        raise BadSignatureError(f"the signature is {abs(now - timestamp)} s old")
