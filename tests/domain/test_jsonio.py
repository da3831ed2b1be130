"""orjson on the hot paths (budgeter/domain/jsonio.py) reads and writes what the json
module did, and parse_json's orjson fast path accepts, refuses and explains exactly what
its json path does."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgeter.domain import jsonio, messages
from budgeter.domain.messages import JsonInputError, parse_json

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=6), children)
    ),
    max_leaves=20,
)


@given(json_values)
def test_dumps_is_compact_utf8_json_that_json_reads_back(value: Any) -> None:
    out = jsonio.dumps(value)
    assert json.loads(out) == value
    assert jsonio.loads(out) == value
    assert jsonio.dumps_str(value) == out.decode()


@given(json_values)
def test_sorted_dumps_is_the_canonical_form_json_wrote(value: Any) -> None:
    """The count cache's digest: the same bytes as json's sort_keys form, floats aside
    (both write the shortest repr, with exponents spelled differently)."""
    if "e" in json.dumps(value) or "E" in json.dumps(value):
        return
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert jsonio.dumps(value, sort_keys=True) == canonical.encode()


def test_dumps_writes_what_orjson_refuses_as_json_did() -> None:
    for value in ({"n": 2**70}, {1: "a"}, [-(2**64)]):
        assert jsonio.dumps(value) == json.dumps(value, separators=(",", ":")).encode()
    assert jsonio.dumps({"b": 1, "a": {2: 3}}, sort_keys=True) == b'{"a":{"2":3},"b":1}'
    assert jsonio.dumps({"é": "\u2028"}) == '{"é":"\u2028"}'.encode()
    with pytest.raises(TypeError):
        jsonio.dumps({"x": object()})


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b"[Infinity, -Infinity]",
        b"18446744073709551616",
        b"[-9223372036854775809, 1]",
        b'"\\ud800"',
        b"1e400",
        b"\xef\xbb\xbf{}",  # json reads bytes with a BOM (orjson does not)
        "[123456789012345678901]",
    ],
)
def test_loads_reads_what_json_reads(raw: bytes | str) -> None:
    got, want = jsonio.loads(raw), json.loads(raw)
    assert repr(got) == repr(want)  # NaN != NaN: compare the spelled-out values
    assert type(got) is type(want)


def test_loads_refuses_what_json_refuses_with_its_message() -> None:
    for raw in (b"{", b"[1,]", b"", b'"a\x00"', "{]"):
        with pytest.raises(ValueError) as got:
            jsonio.loads(raw)
        with pytest.raises(ValueError) as want:
            json.loads(raw)
        assert str(got.value) == str(want.value)
    assert math.isnan(jsonio.loads(memoryview(b"NaN")))


# parse_json: the orjson path against the json path --------------------------------------

HOSTILE = [
    b'{"model": "m", "max_tokens": 5}',
    b" [1, 2.5, -0, -0.0, 1E5, 1e-400, true, false, null] \n",
    b'{"a": 1, "a": 2}',
    b'"\\u0000 \\ud83d\\ude00 \xc3\xa9"',
    b"9223372036854775807",
    b"-9223372036854775808",
    b"9223372036854775808",  # 2**63: past int64, but orjson reads it (as an unsigned int)
    b"18446744073709551616",  # 2**64: orjson reads it as a float
    b"-9223372036854775809",
    b"123456789012345678901234567890.5",
    b'{"n": 1' + b"0" * 5000 + b"}",
    b"1e400",
    b"-1e400",
    b"NaN",
    b"[Infinity]",
    b'"\\ud800"',
    b'{"\\udc00": 1}',
    b"\xef\xbb\xbf{}",
    b'"\xff"',
    b'"a\x00b"',
    b"[1,]",
    b"{}x",
    b"",
    b"   ",
    b"[" * 100 + b"]" * 100,
    b"[" * 101 + b"]" * 101,
    b'{"a":' * 101 + b"1" + b"}" * 101,
    b"[" * 2000 + b"]" * 2000,
    b"[" * 100_000,
    b"01",
    b'"\\x"',
    b"'a'",
]


def _outcome(raw: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(parse_json(raw))
    except JsonInputError as exc:
        return "refused", str(exc)


def _slow_outcome(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    def refuse(_: object) -> object:
        raise orjson.JSONDecodeError("forced", "", 0)

    with monkeypatch.context() as patch:
        patch.setattr(messages.orjson, "loads", refuse)
        return _outcome(raw)


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
def test_parse_json_fast_path_decides_and_explains_as_the_json_path(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _outcome(raw) == _slow_outcome(raw, monkeypatch)


def test_parse_json_keeps_its_clear_refusals() -> None:
    assert _outcome(b"9223372036854775808") == (
        "refused",
        "integer 9223372036854775808 is out of range (64 bits)",
    )
    assert _outcome(b"[1e400]") == ("refused", "number 1e400 is out of range")
    assert _outcome(b"[NaN]") == ("refused", "NaN is not a JSON value")
    assert _outcome(b"[1,]") == ("refused", "Expecting value (line 1, column 4)")
    assert _outcome(b'"\\ud800"') == ("refused", "a string holds a lone UTF-16 surrogate")
    assert _outcome(b"[" * 101 + b"]" * 101) == ("refused", "nested deeper than 100 levels")


@given(json_values, st.sampled_from(["", " ", "\n", "\t "]))
def test_parse_json_fast_path_agrees_on_generated_json(value: Any, space: str) -> None:
    raw = json.dumps(value, indent=space or None, ensure_ascii=bool(space)).encode()
    assert parse_json(raw) == json.loads(raw)


@given(st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()[:-1]))
def test_parse_json_fast_path_agrees_on_garbage(raw: bytes) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _outcome(raw) == _slow_outcome(raw, monkeypatch)
