"""The per-request usage ledger (issue 18, item 1): the home of every format it shares with
admission/settle.lua and admission/reserve.lua.

- :class:`Meta`: what a reservation records for its ledger entry, stored verbatim as its
  ``"x"`` JSON object by reserve.lua: ``s`` source (``batch:<id>/<custom_id>`` or the
  proxy's request id), ``g`` tags (``{key: value}``), ``k`` the API key's id, ``a`` the
  ancestors (added by :meth:`budgeter.admission.admission.Admission.reserve`).
- :class:`LedgerEntry`: one entry of a tenant's ledger stream (``TenantKeys.ledger``),
  appended by settle.lua in the same call as the tenant scope's counters: the stream id's
  milliseconds are the settle's Redis time, the fields are :data:`FIELDS`, always all of
  them in that order (so Redis stores the names once per stream node, not per entry).
- :func:`format_key_usage_field` / :func:`parse_key_usage_field`: the per-key usage fields
  settle.lua adds to the tenant's usage hash, ``k:<key id>:<period>:<period id>:<model>:<kind>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from budgeter.domain.jsonio import dumps_str, loads

Outcome = Literal["settled", "charged_full", "released"]
OUTCOMES: tuple[Outcome, ...] = ("settled", "charged_full", "released")
FIELDS: tuple[str, ...] = (
    "key",
    "ancestors",
    "model",
    "input",
    "output",
    "cache_creation",
    "cache_read",
    "usd",
    "reserved",
    "outcome",
    "source",
    "tags",
)
DEFAULT_RETENTION_DAYS = 35.0  # BUDGETER_LEDGER_RETENTION_DAYS; settle.lua's default too
DAY_MS = 86_400_000


def retention_ms(days: float) -> int:
    """settle.lua's retention argument (ms) for a retention in days."""
    return max(1, int(days * DAY_MS))


def batch_source(batch_id: str, custom_id: str) -> str:
    """The source of a batch job's request: ``batch:<id>/<custom_id>``."""
    return f"batch:{batch_id}/{custom_id}"


def parse_batch_source(source: str) -> tuple[str, str] | None:
    """``(batch id, custom id)`` of a batch source, None for any other source."""
    rest = source.removeprefix("batch:")
    if rest == source:
        return None
    batch_id, sep, custom_id = rest.partition("/")
    if not sep:
        return None
    return batch_id, custom_id


class Meta(BaseModel):
    """A reservation's ``"x"``: who and what the request is for."""

    s: str = ""
    g: dict[str, str] = Field(default_factory=dict)
    k: str | None = None
    a: list[str] = Field(default_factory=list)

    def to_reserve(self) -> dict[str, object]:
        """The mapping for ``Admission.reserve(..., meta=...)`` (which adds ``a`` itself)."""
        out: dict[str, object] = {}
        if self.s:
            out["s"] = self.s
        if self.g:
            out["g"] = dict(self.g)
        if self.k is not None:
            out["k"] = self.k
        return out


def format_meta(meta: Meta) -> str:
    """The ``"x"`` JSON text of a reservation ('' when there is nothing to record)."""
    record = meta.to_reserve()
    if meta.a:
        record["a"] = list(meta.a)
    return dumps_str(record) if record else ""


def parse_meta(text: str) -> Meta:
    return Meta.model_validate(loads(text)) if text else Meta()


def meta_of_reservation(record: str | bytes) -> Meta:
    """The ``"x"`` of a reservation's JSON record (reserve.lua's ``resv`` hash value); an
    empty Meta when it has none or the record does not parse."""
    try:
        parsed = loads(record)
        x = parsed.get("x") if isinstance(parsed, dict) else None
        return Meta.model_validate(x) if isinstance(x, dict) else Meta()
    except ValueError:  # orjson.JSONDecodeError and pydantic's ValidationError
        return Meta()


class LedgerEntry(BaseModel):
    """One settled reservation of a tenant."""

    id: str = Field(description="The stream entry id (cursor): '<ms>-<seq>'.")
    time_ms: int = Field(description="Redis time of the settle, unix ms.")
    tenant: str
    key: str | None = None
    ancestors: list[str] = Field(default_factory=list)
    model: str
    input: int = 0
    output: int = 0
    cache_creation: int = 0
    cache_read: int = 0
    usd: float = 0.0
    reserved: int = 0
    outcome: Outcome
    source: str = ""
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.input + self.output + self.cache_creation + self.cache_read


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entry(tenant: str, entry_id: object, fields: Mapping[Any, Any] | None) -> LedgerEntry:
    """A :class:`LedgerEntry` from one XRANGE item of ``tenant``'s ledger stream."""
    f = {_text(k): _text(v) for k, v in (fields or {}).items()}
    eid = _text(entry_id)
    tags = f.get("tags", "")
    ancestors = f.get("ancestors", "")
    return LedgerEntry(
        id=eid,
        time_ms=int(eid.partition("-")[0]),
        tenant=tenant,
        key=f.get("key") or None,
        ancestors=ancestors.split(",") if ancestors else [],
        model=f["model"],
        input=int(f.get("input", 0)),
        output=int(f.get("output", 0)),
        cache_creation=int(f.get("cache_creation", 0)),
        cache_read=int(f.get("cache_read", 0)),
        usd=float(f.get("usd", 0)),
        reserved=int(f.get("reserved", 0)),
        outcome=f["outcome"],
        source=f.get("source", ""),
        tags={str(k): str(v) for k, v in loads(tags).items()} if tags else {},
    )


def format_entry(entry: LedgerEntry) -> dict[str, str]:
    """The stream fields settle.lua writes for ``entry`` (in :data:`FIELDS` order)."""
    return {
        "key": entry.key or "",
        "ancestors": ",".join(entry.ancestors),
        "model": entry.model,
        "input": str(entry.input),
        "output": str(entry.output),
        "cache_creation": str(entry.cache_creation),
        "cache_read": str(entry.cache_read),
        "usd": f"{entry.usd:.6f}",
        "reserved": str(entry.reserved),
        "outcome": entry.outcome,
        "source": entry.source,
        "tags": dumps_str(entry.tags) if entry.tags else "",
    }


KeyUsageKind = Literal["input", "output", "cache_creation", "cache_read", "requests", "usd"]
KEY_USAGE_KINDS: tuple[KeyUsageKind, ...] = (
    "input",
    "output",
    "cache_creation",
    "cache_read",
    "requests",
    "usd",
)


class KeyUsageField(BaseModel):
    key: str
    period: str  # day | month | total
    period_id: str
    model: str
    kind: KeyUsageKind


def format_key_usage_field(f: KeyUsageField) -> str:
    return f"k:{f.key}:{f.period}:{f.period_id}:{f.model}:{f.kind}"


def parse_key_usage_field(field: str | bytes) -> KeyUsageField | None:
    """The parts of a per-key usage field; None for any other field of the usage hash."""
    text = _text(field)
    if not text.startswith("k:"):
        return None
    parts = text[2:].split(":", 3)
    if len(parts) != 4:
        return None
    key, period, period_id, rest = parts
    model, sep, kind = rest.rpartition(":")
    if not sep or not model or kind not in KEY_USAGE_KINDS:
        return None
    return KeyUsageField(key=key, period=period, period_id=period_id, model=model, kind=kind)
