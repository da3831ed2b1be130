"""What a caller's request carries to the upstream besides its body: the ``anthropic-beta``
values, the caller's ``anthropic-version`` and the query string.

One home for the beta list's text form: the ``anthropic-beta`` header value and the
``betas`` field of a batch's hash are both ``format_betas`` (comma-joined, no spaces),
read back by ``parse_betas``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

BETA_HEADER = "anthropic-beta"
VERSION_HEADER = "anthropic-version"
DEFAULT_VERSION = "2023-06-01"
CLIENT_VERSION = "client"  # BUDGETER_UPSTREAM_ANTHROPIC_VERSION=client: the caller's version
BETA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_BETAS = 64


class PassthroughError(ValueError):
    """A beta or version value that is not a plain name; the message is one line."""


@dataclass(frozen=True, slots=True)
class Passthrough:
    """``betas`` in the caller's order (no repeats), ``version`` the caller's
    anthropic-version (None: not sent), ``query`` the caller's query parameters."""

    betas: tuple[str, ...] = ()
    version: str | None = None
    query: tuple[tuple[str, str], ...] = ()
    # a batch's budgeter-tags (budgeter/ledger/tags.py): for its ledger entries, never sent
    tags: tuple[tuple[str, str], ...] = ()
    # the API key a batch was created with (its jobs are charged to it), never sent; and
    # whether that key had limits of its own then (its jobs reserve in the key's scope too)
    key: str | None = None
    key_limited: bool = False

    @property
    def scope_key(self) -> str | None:
        """What ``Admission.reserve(..., key=)`` takes for the batch's jobs."""
        return self.key if self.key_limited else None


NO_PASSTHROUGH = Passthrough()


def check_beta_name(name: str) -> str:
    if not BETA_NAME_RE.fullmatch(name):
        raise PassthroughError(
            f"invalid beta {name[:80]!r}: 1-128 characters a-z, A-Z, 0-9, '.', '_' or '-'"
        )
    return name


def parse_betas(values: Iterable[str]) -> tuple[str, ...]:
    """The betas of one or more comma lists (every ``anthropic-beta`` header of a request,
    or a stored ``format_betas`` text): trimmed, empty items dropped, first mention kept."""
    seen: dict[str, None] = {}
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if name:
                seen.setdefault(check_beta_name(name), None)
    if len(seen) > MAX_BETAS:
        raise PassthroughError(f"at most {MAX_BETAS} betas")
    return tuple(seen)


def format_betas(betas: Iterable[str]) -> str:
    return ",".join(betas)


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise PassthroughError(f"invalid anthropic-version {version[:80]!r}")
    return version


def refused_beta(betas: Iterable[str], allowed: Collection[str] | None) -> str | None:
    """The first of ``betas`` that ``allowed`` (None: any) does not list."""
    if allowed is None:
        return None
    return next((beta for beta in betas if beta not in allowed), None)
