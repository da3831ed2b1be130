"""The stored form of a job's params (budgeter/domain/job_params.py): what is written reads
back the same, tagged or not; a tag of another version or a malformed value is told apart."""

from __future__ import annotations

import json

import pytest

from budgeter.domain.job_params import (
    PARAMS_VERSION,
    UNREADABLE,
    StoredParams,
    format_params,
    parse_params,
)

PARAMS = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "v1 {not a tag} \u00fcber"}],
    "metadata": {"user_id": "u"},
}


@pytest.mark.parametrize("validated", [True, False])
def test_a_round_trip_keeps_the_params_and_the_tag(validated: bool) -> None:
    stored = format_params(PARAMS, validated=validated)
    for raw in (stored, stored.decode()):  # bytes, or str as redis-py decodes it
        assert parse_params(raw) == StoredParams(PARAMS, validated=validated)


def test_the_tagged_form_is_the_version_then_the_json_and_the_untagged_is_plain_json() -> None:
    assert format_params(PARAMS, validated=True).startswith(f"v{PARAMS_VERSION} {{".encode())
    assert json.loads(format_params(PARAMS)) == PARAMS  # what a foreign producer writes


def test_a_foreign_producers_json_is_untagged_whatever_its_spacing() -> None:
    assert parse_params('  {"model": "m"}\n') == StoredParams({"model": "m"}, validated=False)


def test_a_tag_of_another_version_is_read_but_not_trusted() -> None:
    for version in (0, PARAMS_VERSION + 1, 10):
        assert parse_params(f'v{version} {{"model": "m"}}') == StoredParams({"model": "m"})


@pytest.mark.parametrize(
    "raw",
    ["", "{not json", "[1, 2]", '"text"', "v1", "v1{}", "vx {}", "v {}", "v1 [1]", "v1 {"],
)
def test_what_holds_no_json_object_is_unreadable(raw: str) -> None:
    found = parse_params(raw)
    assert found is UNREADABLE and not found.readable and found.params == {}
    assert not found.validated
