"""The pass-through values: beta lists (header and stored text, one format), versions, and
the two settings that govern them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgeter.domain.passthrough import (
    PassthroughError,
    check_version,
    format_betas,
    parse_betas,
    refused_beta,
)
from budgeter.domain.policy import TenantPolicy
from budgeter.settings import SettingsError, load_settings

beta_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")


@given(st.lists(beta_names, max_size=10, unique=True))
def test_betas_round_trip_through_their_text(betas: list[str]) -> None:
    assert parse_betas([format_betas(betas)]) == tuple(betas)


def test_every_header_and_comma_list_counts_trimmed_and_once() -> None:
    headers = ["claude-code-20250219, interleaved-thinking-2025-05-14", " ,claude-code-20250219"]
    assert parse_betas(headers) == ("claude-code-20250219", "interleaved-thinking-2025-05-14")
    assert parse_betas([]) == () and parse_betas(["", " , "]) == ()


@pytest.mark.parametrize("bad", ["has space", "semi;colon", "new\nline", "-leading", "é"])
def test_a_beta_that_is_not_a_plain_name_is_refused(bad: str) -> None:
    with pytest.raises(PassthroughError, match="invalid beta"):
        parse_betas([bad])


def test_too_many_betas_are_refused() -> None:
    with pytest.raises(PassthroughError, match="at most"):
        parse_betas([",".join(f"b{i}" for i in range(65))])


def test_refused_beta_names_the_first_one_not_listed() -> None:
    assert refused_beta(("a", "b", "c"), None) is None
    assert refused_beta(("a", "b", "c"), ["a"]) == "b"
    assert refused_beta((), []) is None
    assert refused_beta(("a",), []) == "a"


def test_versions_are_plain_tokens() -> None:
    assert check_version("2023-06-01") == "2023-06-01"
    with pytest.raises(PassthroughError):
        check_version("2023-06-01\r\nx-api-key: stolen")


def test_allowed_betas_setting_takes_a_comma_list_or_a_json_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().allowed_betas is None  # default: any
    for raw, expected in [
        ("a-1, b-2", ("a-1", "b-2")),
        ('["x", "y"]', ("x", "y")),
        ("[]", ()),
        ("", None),
    ]:
        monkeypatch.setenv("BUDGETER_ALLOWED_BETAS", raw)
        assert load_settings().allowed_betas == expected, raw
    for raw in ["a b", "[1]", "[", '{"a": 1}']:
        monkeypatch.setenv("BUDGETER_ALLOWED_BETAS", raw)
        with pytest.raises(SettingsError, match=r"^BUDGETER_ALLOWED_BETAS: "):
            load_settings()


def test_upstream_version_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().upstream_anthropic_version == "2023-06-01"
    for value in ("client", "2025-01-01"):
        monkeypatch.setenv("BUDGETER_UPSTREAM_ANTHROPIC_VERSION", value)
        assert load_settings().upstream_anthropic_version == value
    monkeypatch.setenv("BUDGETER_UPSTREAM_ANTHROPIC_VERSION", "two words")
    with pytest.raises(SettingsError, match=r"^BUDGETER_UPSTREAM_ANTHROPIC_VERSION: "):
        load_settings()


def test_policy_allowed_betas_are_checked_names() -> None:
    assert TenantPolicy().allowed_betas is None
    policy = TenantPolicy.model_validate({"allowed_betas": ["a-1", "b", "a-1"]})
    assert policy.allowed_betas == ["a-1", "b"]
    with pytest.raises(ValueError, match="invalid beta"):
        TenantPolicy.model_validate({"allowed_betas": ["a,b"]})
