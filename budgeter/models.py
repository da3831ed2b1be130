"""Pydantic models at the edges: Messages requests and Message Batches requests.

They check what the Messages API requires (``model``, ``messages`` with roles and
content, ``max_tokens`` >= 1) and pass every other field through unchanged, since the API
keeps growing.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_BATCH_REQUESTS = 100_000


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessageParams(BaseModel):
    """A /v1/messages request body: required fields checked, the rest kept as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)
    messages: list[Message] = Field(min_length=1)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str
    params: MessageParams

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, value: str) -> str:
        if not CUSTOM_ID_RE.fullmatch(value):
            raise ValueError("must match ^[a-zA-Z0-9_-]{1,64}$")
        return value

    def params_dict(self) -> dict[str, Any]:
        """The params exactly as given (unknown fields included)."""
        return self.params.model_dump(mode="json", exclude_unset=True)


def first_error(exc: ValidationError) -> str:
    """One line: ``field.path: message``."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])
