"""Pydantic models at the edges: Messages requests and Message Batches requests.

They check what the Messages API requires (``model``, ``messages`` with roles and
content, ``max_tokens`` >= 1) and pass every other field through unchanged, since the API
keeps growing. :func:`parse_json` is the one JSON reader for what callers send (HTTP
bodies, ``budgeter submit`` lines): strict RFC 8259 JSON, bounded nesting.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any, Literal, NoReturn, TypeAlias

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_BATCH_REQUESTS = 100_000
# Far above any model's output window; keeps every reservation (input + max_tokens, summed
# in Lua doubles and Redis int64 counters) exact.
MAX_TOKENS_LIMIT = 2**31 - 1
# The fields of a Messages request that ``/v1/messages/count_tokens`` accepts (the
# upstream refuses any other); the API's CountTokensBody schema lists the same.
COUNT_TOKENS_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking"})
# Deeper input is refused before anything walks it recursively (validation, json.dumps of
# the queued job, the token counter's hash) and could hit a recursion limit.
MAX_JSON_DEPTH = 100
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# orjson reads an integer beyond 64 bits as a float: input with such a long run of digits
# takes the json module's path, which refuses it (18 digits always fit in 64 bits)
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


JsonValue: TypeAlias = "dict[str, JsonValue] | list[JsonValue] | str | int | float | bool | None"


class JsonInputError(ValueError):
    """Input that is not strict JSON; the message is one line."""


def _no_constant(name: str) -> NoReturn:
    raise JsonInputError(f"{name} is not a JSON value")


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise JsonInputError(f"integer {text[:24]} is out of range (64 bits)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonInputError(f"number {text[:24]} is out of range")
    return value


def _check_tree(value: JsonValue, *, surrogates: bool) -> None:
    """Nesting at most MAX_JSON_DEPTH; no lone surrogates (only looked for when asked)."""
    stack: list[tuple[JsonValue, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[JsonValue] = node.values()
            if surrogates and any(_SURROGATE.search(key) for key in node):
                raise JsonInputError("a string holds a lone UTF-16 surrogate")
        elif isinstance(node, list):
            children = node
        else:
            if surrogates and isinstance(node, str) and _SURROGATE.search(node):
                raise JsonInputError("a string holds a lone UTF-16 surrogate")
            continue
        if depth > MAX_JSON_DEPTH:
            raise JsonInputError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes) -> JsonValue:
    """Strict JSON from bytes: UTF-8, no NaN/Infinity, finite floats, 64-bit integers, no
    lone surrogates, at most MAX_JSON_DEPTH levels; else :class:`JsonInputError`.

    orjson reads it when it can: it refuses all of those but long integers (kept from it)
    and depth (checked after); whatever it refuses is read again by ``json``, whose
    messages say what is wrong (line and column)."""
    if _LONG_DIGITS.search(raw) is None:
        try:
            fast: JsonValue = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            _check_tree(fast, surrogates=False)  # orjson refuses lone surrogates
            return fast
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonInputError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        value: JsonValue = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_int64
        )
    except JsonInputError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError:  # an integer of more than 4300 digits
        raise JsonInputError("a number is out of range") from None
    except RecursionError:
        raise JsonInputError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_tree(value, surrogates=_SURROGATE_ESCAPE.search(raw) is not None)
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    # "system" mid-conversation: Claude Code sends it (beta mid-conversation-system-*);
    # whether it is allowed without that beta is the upstream's to say
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class MessageParams(BaseModel):
    """A /v1/messages request body: required fields checked, the rest kept as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1, le=MAX_TOKENS_LIMIT)
    messages: list[Message] = Field(min_length=1)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(json_schema_extra={"pattern": CUSTOM_ID_RE.pattern})
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
