"""What admission answers: a reserve's :class:`Decision` (with the sentence that explains
a refusal), the :class:`Usage` a settle charges, and a settle's :class:`SettleResult`.
They parse the replies of admission/reserve.lua and admission/settle.lua."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

from budgeter.admission.reasons import Reason, parse_reason
from budgeter.domain.pricing import GENAI_PRICES_VERSION

if TYPE_CHECKING:
    from budgeter.metrics import Metrics

DecisionKind = Literal["ADMIT", "DEFER", "REJECT"]


ReplyItem = str | bytes | int
"""One element of a script's reply, as redis-py decodes it."""


def text_of(value: ReplyItem) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of admission/reserve.lua. ``until_ms``: for a DEFER the first ms it fits
    (0: once in-flight work settles), for a REJECT the budget's reset, for an ADMIT the
    first ms the tenant's request rate takes another request when it has no room now (0:
    it has room, or no request rate)."""

    kind: DecisionKind
    until_ms: int
    reason: str
    now_ms: int
    detail: str = ""

    @classmethod
    def from_reply(cls, reply: Sequence[ReplyItem]) -> Decision:
        if not reply[2] and reply[0] in ("ADMIT", b"ADMIT"):  # the common answer, at once
            return cls("ADMIT", int(reply[1]), "", int(reply[3]))
        kind = text_of(reply[0])
        if kind not in ("ADMIT", "DEFER", "REJECT"):
            raise ValueError(f"unexpected admission/reserve.lua reply {reply!r}")
        return cls(
            cast(DecisionKind, kind),
            int(reply[1]),
            text_of(reply[2]),
            int(reply[3]),
            text_of(reply[4]),
        )

    def named(self, prefix: str) -> Decision:
        """This refusal as the answer of a whole chain: its reason prefixed by its scope."""
        return replace(self, reason=prefix + self.reason) if prefix else self

    @property
    def next_request_ms(self) -> int:
        """An ADMIT that left the request rate no room: the ms it takes the next request
        (a worker parks the tenant until then rather than lease a job it would defer)."""
        return self.until_ms if self.kind == "ADMIT" and self.until_ms > self.now_ms else 0

    @property
    def waits_for_settle(self) -> bool:
        """DEFER with no time: it may fit once in-flight reservations settle."""
        return self.kind == "DEFER" and self.until_ms == 0

    @property
    def waits_for_reset(self) -> bool:
        """DEFER on an exhausted budget of the tenant (its policy says on_exhausted 'wait'):
        it fits no sooner than the period's reset."""
        reason = self.parsed_reason
        return (
            self.kind == "DEFER"
            and reason is not None
            and reason.kind == "exhausted"
            and not reason.account
        )

    @property
    def reason_kind(self) -> str:
        """The kind of the reason whichever scope refused (``key:model_not_allowed`` and
        ``parent:org:model_not_allowed`` are both ``model_not_allowed``), else the reason."""
        reason = self.parsed_reason
        return self.reason if reason is None else reason.kind

    @property
    def parsed_reason(self) -> Reason | None:
        """The typed reason (None for ADMIT or a reason outside the vocabulary)."""
        try:
            return parse_reason(self.reason) if self.reason else None
        except ValueError:
            return None

    def describe(self, model: str | None = None) -> str:
        """A sentence for error messages: which limit, and when it resets."""
        if self.kind == "ADMIT":
            return "admitted"
        reason = self.parsed_reason
        if reason is None:
            return self.reason
        owner = "the "
        if reason.account:
            owner = "the upstream account's "
        elif reason.parent:
            owner = f"the parent tenant {reason.parent!r}'s "
        elif reason.key:
            owner = "this API key's "
        if reason.limit is not None:
            return _LIMIT_SENTENCES[reason.kind](self, owner, reason.limit.label(model))
        if reason.kind == "model_not_allowed" and (reason.parent or reason.key):
            whose = f"the parent tenant {reason.parent!r}" if reason.parent else "this API key"
            return f"model {model or self.detail!r} is not in the allowed_models of {whose}"
        sentence = _SENTENCES[reason.kind](self, model)
        if reason.parent:
            return f"{sentence} (a limit of the parent tenant {reason.parent!r})"
        return f"{sentence} (a limit of this API key)" if reason.key else sentence

    def _when(self, words: str) -> str:
        return f"{words}{format_ms(self.until_ms)}" if self.until_ms else ""

    def _too_large(self, owner: str, label: str) -> str:
        cost, _, limit = self.detail.partition("/")
        unit = "" if "USD" in label else (" request" if label.startswith("rpm ") else " tokens")
        return f"request needs {cost}{unit} but {owner}{label} is {limit}"

    def _exhausted(self, owner: str, label: str) -> str:
        if self.kind == "DEFER":
            return f"{owner}{label} exhausted; waiting for its reset{self._when(' until ')}"
        used, _, limit = self.detail.partition("/")
        return f"{owner}{label} exhausted ({used} of {limit} used){self._when('; it resets at ')}"

    def _rate(self, owner: str, label: str) -> str:
        return f"{owner}{label} reached{self._when('; fits again at ')}"

    @staticmethod
    def _inflight(owner: str, label: str) -> str:
        return f"{owner}{label} is held by in-flight requests; waiting for them to settle"

    def _paused(self, model: str | None) -> str:
        which = f"model {model}" if model else "this model"
        return f"the upstream rate-limited {which} (429); paused{self._when(' until ')}"

    def _model_not_allowed(self, model: str | None) -> str:
        return f"model {model or self.detail!r} is not in this tenant's allowed_models"

    def _unpriced_model(self, model: str | None) -> str:
        return (
            f"model {model or self.detail!r} has no price (genai-prices "
            f"{GENAI_PRICES_VERSION} does not know it): a usd budget cannot admit it "
            "until BUDGETER_PRICES prices it"
        )


_LIMIT_SENTENCES: dict[str, Callable[[Decision, str, str], str]] = {
    "too_large": Decision._too_large,
    "exhausted": Decision._exhausted,
    "rate": Decision._rate,
    "inflight": lambda _decision, owner, label: Decision._inflight(owner, label),
}
_SENTENCES: dict[str, Callable[[Decision, str | None], str]] = {
    "concurrency": lambda _d, _m: "max_concurrency reached; waiting for in-flight requests",
    "paused": Decision._paused,
    "model_not_allowed": Decision._model_not_allowed,
    "unpriced_model": Decision._unpriced_model,
    "unknown_tenant": lambda _d, _m: "tenant has no policy",
}


def format_ms(ms: int, *, precise: bool = False) -> str:
    """RFC 3339 in UTC with a Z (milliseconds when ``precise``)."""
    return (
        dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
        .isoformat(timespec="milliseconds" if precise else "seconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """What the upstream reported for one message."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Usage:
        usage = message.get("usage") or {}
        return cls(
            int(usage.get("input_tokens") or 0),
            int(usage.get("output_tokens") or 0),
            int(usage.get("cache_creation_input_tokens") or 0),
            int(usage.get("cache_read_input_tokens") or 0),
        )

    def record(self, metrics: Metrics, tenant: str, model: str, reserved: int) -> None:
        """Count this usage in ``metrics``."""
        metrics.record_settled(
            tenant,
            model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_creation=self.cache_creation_input_tokens,
            cache_read=self.cache_read_input_tokens,
            reserved=reserved,
        )

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


@dataclass(frozen=True, slots=True)
class SettleResult:
    """The answer of admission/settle.lua."""

    settled: int
    waiting_settle: bool
    charged_full: int
    released: int
    actual_tokens: int
    reserved_tokens: int
    events: int = 0  # notification events the settle appended to the outbox
    waiting_ancestors: tuple[str, ...] = ()  # ancestors where a DEFER waited for settles

    @classmethod
    def from_reply(cls, reply: Sequence[ReplyItem]) -> SettleResult:
        settled, waiting, full, released, actual, reserved, events = (int(x) for x in reply)
        return cls(settled, bool(waiting), full, released, actual, reserved, events)
