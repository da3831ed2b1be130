"""Request tags (issue 18, item 2): ``budgeter-tags: team=search,feature=rerank`` on
``/v1/messages`` and on batch creation, and Anthropic's ``metadata.user_id`` as tag ``user``.

At most :data:`MAX_TAGS` tags; keys match :data:`TAG_KEY_RE`, values are at most
:data:`MAX_VALUE_CHARS` characters (no control characters). A bad tag is a
:class:`TagError` naming it (the API answers 400). Tags are never logged at INFO.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

HEADER = "budgeter-tags"
MAX_TAGS = 8
MAX_VALUE_CHARS = 128
TAG_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
USER_TAG = "user"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TagError(ValueError):
    """A bad tag; the message names it."""


def _short(text: str) -> str:
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def check_tag(key: str, value: str) -> None:
    if not TAG_KEY_RE.fullmatch(key):
        raise TagError(
            f"tag {_short(key)}: keys are 1-32 characters a-z, 0-9 or '_', starting with a letter"
        )
    if len(value) > MAX_VALUE_CHARS:
        raise TagError(f"tag {key!r}: the value is longer than {MAX_VALUE_CHARS} characters")
    if _CONTROL.search(value):
        raise TagError(f"tag {key!r}: the value has control characters")


def parse_tags_header(header: str | None) -> dict[str, str]:
    """The tags of a ``budgeter-tags`` header (``k=v,k2=v2``; blank: none)."""
    tags: dict[str, str] = {}
    if header is None or not header.strip():
        return tags
    for part in header.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise TagError(f"tag {_short(key)}: write it as key=value")
        check_tag(key, value)
        if key in tags:
            raise TagError(f"tag {key!r} is given twice")
        tags[key] = value
    if len(tags) > MAX_TAGS:
        raise TagError(f"{len(tags)} tags: at most {MAX_TAGS}")
    return tags


def format_tags_header(tags: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in tags.items())


def request_tags(header_tags: Mapping[str, str], params: Mapping[str, object]) -> dict[str, str]:
    """A request's tags: the header's (or its batch's) and ``metadata.user_id`` as ``user``
    (the header's ``user`` wins)."""
    tags = dict(header_tags)
    metadata = params.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    if isinstance(user, str) and user and USER_TAG not in tags and len(tags) < MAX_TAGS:
        tags[USER_TAG] = user_tag(user)
    return tags


def user_tag(user_id: str) -> str:
    """``metadata.user_id`` as the ``user`` tag's value. It is the Messages API's own field
    (Claude Code sends a long JSON one), so it never refuses a request: a value over
    MAX_VALUE_CHARS keeps its first 100 characters and a digest of the whole, control
    characters become spaces; with 8 tags already, it is left out."""
    clean = _CONTROL.sub(" ", user_id)
    if len(clean) <= MAX_VALUE_CHARS:
        return clean
    return f"{clean[:100]}~{hashlib.sha256(user_id.encode()).hexdigest()[:16]}"


def proxy_meta(
    request_id: str, header: str | None, params: Mapping[str, object], key_id: str | None
) -> dict[str, object]:
    """The reservation meta of a ``/v1/messages`` call (budgeter/ledger/entry.py ``Meta``):
    source its request id, its tags, its API key's id. Bad tags: :class:`TagError`."""
    meta: dict[str, object] = {"s": request_id}
    tags = request_tags(parse_tags_header(header), params)
    if tags:
        meta["g"] = tags
    if key_id:
        meta["k"] = key_id
    return meta


def job_meta(
    batch_id: str, custom_id: str, batch_tags: Mapping[str, str], params: Mapping[str, object]
) -> dict[str, object]:
    """The reservation meta of a batch job: source ``batch:<id>/<custom_id>``, the batch's
    tags and its ``metadata.user_id`` (dropped when not a valid tag: the job still runs)."""
    meta: dict[str, object] = {"s": f"batch:{batch_id}/{custom_id}"}
    try:
        tags = request_tags(batch_tags, params)
    except TagError:
        tags = dict(batch_tags)
    if tags:
        meta["g"] = tags
    return meta
