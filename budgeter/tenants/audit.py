"""The audit log: every admin write (a policy created, replaced, patched or deleted, a key
created or revoked, the global policy replaced, ``tenants apply``) as one entry of a Redis
Stream: when, who (the admin token's name, or ``cli:<os user>``), the request id and client
address, the action, its target and the field-level before → after changes, the format
``tenants apply`` prints. Never a secret: a key is named by its id, a token by its name.

Bounded: entries older than ``retention_days`` and beyond ``max_entries`` are trimmed on
every append (``MINID`` and ``MAXLEN``)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field
from pydantic import JsonValue as ModelJson

from budgeter.domain.messages import JsonValue
from budgeter.settings import Settings
from budgeter.store.keys import audit_log_key
from budgeter.store.types import RedisClient

DAY_MS = 86_400_000
SCAN_CHUNK = 500  # entries read per XREVRANGE while filtering
UNSET = "(unset)"  # a field absent before or after, as `tenants apply` shows it

ACTIONS = (
    "tenant.create",
    "tenant.update",
    "tenant.delete",
    "key.create",
    "key.revoke",
    "global_policy.update",
)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: an admin token's name or ``cli:<user>``, and from where."""

    name: str
    client: str = ""
    request_id: str = ""


class FieldChange(BaseModel):
    field: str = Field(description="Dotted path of the field, e.g. budgets.day ('' = whole).")
    before: ModelJson = Field(description="The value before; absent: null with unset true.")
    after: ModelJson = None
    before_unset: bool = False
    after_unset: bool = False


class AuditEntry(BaseModel):
    id: str = Field(description="Stream id (also the pagination cursor).")
    time_ms: int
    actor: str
    request_id: str = ""
    client: str = ""
    action: str
    target: str = Field(description="The tenant, or tenant/key:<id>, or global-policy.")
    changes: list[FieldChange] = Field(default_factory=list)


class AuditPage(BaseModel):
    data: list[AuditEntry]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as cursor= for the next (older) page.")


def leaves(value: JsonValue, prefix: str = "") -> dict[str, JsonValue]:
    """The leaves of a JSON object by dotted path; None and empty objects are unset."""
    if isinstance(value, dict):
        out: dict[str, JsonValue] = {}
        for key, item in value.items():
            out.update(leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {} if value is None else {prefix: value}


def diff(before: JsonValue, after: JsonValue) -> list[FieldChange]:
    """Field-level changes between two JSON documents (None: the document is absent)."""
    old, new = leaves(before), leaves(after)
    paths = [*old, *(p for p in new if p not in old)]
    return [
        FieldChange(
            field=path,
            before=_model_json(old.get(path)),
            after=_model_json(new.get(path)),
            before_unset=path not in old,
            after_unset=path not in new,
        )
        for path in paths
        if (path in old) != (path in new) or old.get(path) != new.get(path)
    ]


def _model_json(value: JsonValue) -> ModelJson:
    return value  # the same JSON values, two spellings of their type


def show_change(change: FieldChange) -> str:
    """``budgets.day: 100 → 200``, as ``tenants apply`` prints a change."""

    def shown(value: ModelJson, unset: bool) -> str:
        return UNSET if unset else json.dumps(value, ensure_ascii=False)

    where = change.field or "(whole)"
    return f"{where}: {shown(change.before, change.before_unset)} → " + shown(
        change.after, change.after_unset
    )


def format_fields(
    actor: Actor, action: str, target: str, changes: Sequence[FieldChange]
) -> dict[str, str]:
    """An entry's stream fields (the stream id carries the time)."""
    return {
        "actor": actor.name,
        "request_id": actor.request_id,
        "client": actor.client,
        "action": action,
        "target": target,
        "changes": json.dumps([c.model_dump(mode="json") for c in changes], ensure_ascii=False),
    }


def parse_entry(entry_id: str, fields: dict[str, str]) -> AuditEntry:
    """An entry read back (format_fields' inverse, with the id)."""
    return AuditEntry(
        id=entry_id,
        time_ms=int(entry_id.split("-", 1)[0]),
        actor=fields.get("actor", ""),
        request_id=fields.get("request_id", ""),
        client=fields.get("client", ""),
        action=fields.get("action", ""),
        target=fields.get("target", ""),
        changes=[FieldChange.model_validate(c) for c in json.loads(fields.get("changes", "[]"))],
    )


CURSOR_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
RELATIVE_RE = re.compile(r"^([0-9]{1,9})([smhd])$")
UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}


class BadQueryError(ValueError):
    """A ``since`` or ``cursor`` that is not one; the message names it."""


def parse_since(text: str, *, now_ms: int) -> int:
    """``since`` as unix milliseconds: RFC 3339 / ISO 8601 (a date alone is midnight UTC,
    a time without offset is UTC), unix milliseconds, or a span back from now (``90m``,
    ``24h``, ``7d``)."""
    text = text.strip()
    relative = RELATIVE_RE.fullmatch(text)
    if relative:
        return now_ms - int(relative.group(1)) * UNIT_MS[relative.group(2)]
    if text.isdigit() and len(text) <= 15:
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadQueryError(
            f"since: not a time: {text[:40]!r} (RFC 3339, unix milliseconds, or 24h / 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def check_cursor(text: str) -> str:
    if not CURSOR_RE.fullmatch(text):
        raise BadQueryError(f"cursor: not an audit entry id: {text[:40]!r}")
    return text


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class AuditLog:
    @classmethod
    def of(cls, redis: RedisClient, settings: Settings) -> AuditLog:
        return cls(
            redis,
            prefix=settings.key_prefix,
            retention_days=settings.audit_retention_days,
            max_entries=settings.audit_max_entries,
        )

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "budgeter",
        retention_days: float = 400.0,
        max_entries: int = 100_000,
    ) -> None:
        self.redis = redis
        self.key = audit_log_key(prefix)
        self.retention_ms = int(retention_days * DAY_MS)
        self.max_entries = max_entries

    async def record(
        self,
        actor: Actor,
        action: str,
        target: str,
        changes: Sequence[FieldChange] = (),
        *,
        now_ms: int,
    ) -> str:
        """Append one entry (its id, and so its time, from Redis's clock) after trimming
        the entries older than the retention, counted back from ``now_ms``; at most
        ``max_entries`` are kept. Exact trims: admin writes are rare."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xtrim(self.key, minid=str(max(0, now_ms - self.retention_ms)), approximate=False)
            pipe.xadd(
                self.key,
                format_fields(actor, action, target, changes),  # type: ignore[arg-type]
                maxlen=self.max_entries,
                approximate=False,
            )
            _, entry_id = await pipe.execute()
        return _text(entry_id)

    async def read(
        self,
        *,
        target: str | None = None,
        actor: str | None = None,
        since_ms: int | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> AuditPage:
        """Newest first. ``target`` matches a tenant and its keys (``acme`` and
        ``acme/key:...``); ``cursor`` is the last id of the previous page."""
        low = "-" if since_ms is None else f"{since_ms}-0"
        high = "+" if cursor is None else f"({cursor}"
        found: list[AuditEntry] = []
        while len(found) <= limit:
            chunk = await self.redis.xrevrange(self.key, max=high, min=low, count=SCAN_CHUNK)
            if not chunk:
                break
            for raw_id, raw_fields in chunk:
                fields = {_text(k): _text(v) for k, v in (raw_fields or {}).items() if v}
                entry = parse_entry(_text(raw_id or b"0-0"), fields)
                if _matches(entry, target, actor):
                    found.append(entry)
            high = f"({_text(chunk[-1][0] or b'0-0')}"
            if len(chunk) < SCAN_CHUNK:
                break
        page = found[:limit]
        more = len(found) > limit
        return AuditPage(data=page, has_more=more, next_cursor=page[-1].id if more else None)


def _matches(entry: AuditEntry, target: str | None, actor: str | None) -> bool:
    if actor is not None and entry.actor != actor:
        return False
    return target is None or entry.target == target or entry.target.startswith(f"{target}/")


def policy_changes(before: BaseModel | None, after: BaseModel | None) -> list[FieldChange]:
    """The changes between two policies (None: absent), as ``tenants apply`` shows them:
    an update compares every field, defaults included (``weight: 1.0 → 3.0``); a creation
    or deletion names the fields set away from their defaults."""
    both = before is not None and after is not None

    def dumped(policy: BaseModel | None) -> JsonValue:
        if policy is None:
            return None
        return policy.model_dump(mode="json", exclude_defaults=not both)

    return diff(dumped(before), dumped(after))


def lines(entries: Iterable[AuditEntry]) -> list[str]:
    """One line per entry and one per change, for the CLI."""
    out = []
    for e in entries:
        when = dt.datetime.fromtimestamp(e.time_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        origin = f" from {e.client}" if e.client else ""
        out.append(f"{when}  {e.actor}{origin}  {e.action}  {e.target}")
        out.extend(f"    ~ {show_change(c)}" for c in e.changes)
    return out
