"""JSON on the hot paths, with orjson: what the API and the mock answer, the upstream
request bodies and answers, the queued params, the results, the Lua arguments.

The output is compact UTF-8 JSON (no spaces, non-ASCII characters as themselves, not
``\\uXXXX``): any JSON reader reads it as it read the ``json`` module's output. Where
orjson refuses a value ``json`` takes (an integer beyond 64 bits, a dict key that is not
a string), :func:`dumps` falls back to ``json``, so nothing that was written before fails
now; NaN and infinities, which ``json`` wrote as the invalid tokens ``NaN``/``Infinity``,
are written as ``null``. :func:`loads` reads what it is given as ``json.loads`` did: orjson
first, ``json`` for what orjson refuses (NaN, Infinity, integers beyond 64 bits, lone
surrogates), raising ``ValueError`` (``json.JSONDecodeError``) for what neither reads.
Input from callers goes through :func:`budgeter.domain.messages.parse_json` instead,
which refuses those clearly.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# orjson reads an integer beyond 64 bits as a float; json reads it exactly (an integer
# of 18 digits or fewer always fits in 64 bits)
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")

_COMPACT = (",", ":")


def dumps(value: object, *, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON bytes of ``value`` (``sort_keys``: every object's keys in order,
    a canonical form); ``TypeError``/``ValueError`` when it holds what JSON cannot."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError:  # orjson.JSONEncodeError: a 65-bit integer, a non-str key, ...
        text = json.dumps(value, separators=_COMPACT, ensure_ascii=False, sort_keys=sort_keys)
        return text.encode()


def dumps_str(value: object) -> str:
    """:func:`dumps` as text (for aiohttp's ``json_response(..., dumps=dumps_str)``)."""
    return dumps(value).decode()


def loads(data: bytes | bytearray | memoryview | str) -> Any:  # noqa: ANN401 -- any JSON value
    """The JSON value in ``data``, read as ``json.loads`` reads it (faster)."""
    if isinstance(data, memoryview):
        data = bytes(data)
    if isinstance(data, str):
        long_number = _LONG_DIGITS_TEXT.search(data) is not None
    else:
        long_number = _LONG_DIGITS.search(data) is not None
    if not long_number:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
