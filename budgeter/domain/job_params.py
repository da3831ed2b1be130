"""How a queued job's params are stored: the value of its entry in the tenant's ``jobs``
hash (job id -> this). One home for the format: :meth:`JobQueue.submit` writes it, the
queue's readers (the dequeue that hands jobs to workers, ``job_body``) read it.

A value is the params' JSON object, optionally preceded by a tag ``v<N>`` and one space
saying that the producer validated the params with ``MessageParams`` of params version N
(``PARAMS_VERSION``). The Batches API and ``budgeter submit`` (both through
:meth:`BatchStore.create`, whose requests are validated ``BatchRequest`` models) write the
tag; a producer writing Redis directly writes the bare JSON. The worker validates again
only what is not tagged with the version it knows: untagged params, or a tag of another
version (a producer older or newer than the worker). A JSON text never starts with ``v``,
so the two forms cannot be mistaken for each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from budgeter.domain import jsonio

PARAMS_VERSION = 1
"""Raise it whenever ``MessageParams`` comes to refuse what it accepted before: params
tagged with an older version are then validated again by the worker."""

_TAG = f"v{PARAMS_VERSION} ".encode()


@dataclass(frozen=True, slots=True)
class StoredParams:
    params: dict[str, Any]  # empty when not readable
    validated: bool = False  # by MessageParams of PARAMS_VERSION: not to validate again
    readable: bool = True  # False: no JSON object (a foreign producer's mistake)


UNREADABLE = StoredParams({}, readable=False)


def format_params(params: Mapping[str, Any], *, validated: bool = False) -> bytes:
    """The stored form of ``params``; ``validated``: the caller validated them with
    ``MessageParams`` (this version), so the worker will not validate them again."""
    body = jsonio.dumps(params)
    return _TAG + body if validated else body


def parse_params(raw: bytes | str) -> StoredParams:
    """The params stored in ``raw`` and whether they carry this version's tag;
    ``UNREADABLE`` when ``raw`` holds no JSON object or a malformed tag."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    validated = False
    if data[:1] == b"v":
        tag, space, data = data.partition(b" ")
        if not (space and tag[1:].isdigit()):
            return UNREADABLE
        validated = tag + space == _TAG
    try:
        params = jsonio.loads(data)
    except ValueError:
        return UNREADABLE
    if not isinstance(params, dict):
        return UNREADABLE
    return StoredParams(params, validated)
