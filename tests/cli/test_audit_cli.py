"""``budgeter audit`` and the CLI's own writes in the audit log (issue 17, item 7): every
``tenants set|delete|apply`` and ``keys create|revoke`` enters the log as ``cli:<os user>``
with its changes, never the key; filters and bad input are one-line errors."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from budgeter.cli.commands import main


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sync_redis.Redis]:
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


def entries(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(["audit", "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_writes_are_audited_as_the_os_user(
    env: sync_redis.Redis, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["tenants", "set", "acme", "--policy", '{"budgets": {"day": 100}}']) == 0
    assert main(["tenants", "set", "acme", "--merge", "--policy", '{"budgets": {"day": 200}}']) == 0
    capsys.readouterr()
    assert main(["keys", "create", "acme"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert main(["keys", "revoke", "acme", created["id"]]) == 0
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  acme:\n    weight: 3\n  beta: {}\n")
    assert main(["tenants", "apply", str(tenants)]) == 0
    assert main(["tenants", "delete", "beta"]) == 0

    found = list(reversed(entries(capsys)))
    user = f"cli:{getpass.getuser()}"
    assert {e["actor"] for e in found} == {user}
    assert [(e["action"], e["target"]) for e in found] == [
        ("tenant.create", "acme"),
        ("tenant.update", "acme"),
        ("key.create", f"acme/key:{created['id']}"),
        ("key.revoke", f"acme/key:{created['id']}"),
        ("tenant.update", "acme"),  # apply: weight 3, the budget dropped
        ("tenant.create", "beta"),
        ("tenant.delete", "beta"),
    ]
    apply_ids = {found[4]["request_id"], found[5]["request_id"]}
    assert len(apply_ids) == 1  # one apply, one request id
    assert {c["field"] for c in found[4]["changes"]} == {"weight", "budgets.day"}  # type: ignore[union-attr]
    assert created["key"] not in json.dumps(env.xrange("budgeter:{audit}:log"))

    capsys.readouterr()
    assert main(["audit", "--tenant", "acme", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "tenant.update  acme" in text and "~ weight: 1.0 → 3.0" in text
    assert "beta" not in text


@pytest.mark.usefixtures("env")
def test_audit_filters_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert entries(capsys) == []
    assert main(["audit"]) == 0
    assert capsys.readouterr().out.strip() == "no audit entries"
    assert main(["tenants", "set", "acme", "--policy", "{}"]) == 0
    assert entries(capsys, "--since", "2999-01-01") == []
    assert len(entries(capsys, "--since", "1h")) == 1
    assert entries(capsys, "--actor", "someone-else") == []
    capsys.readouterr()
    assert main(["audit", "--since", "yesterday"]) == 2
    assert capsys.readouterr().err.strip() == (
        "budgeter: error: --since: not a time: 'yesterday' (RFC 3339, unix milliseconds, "
        "or 24h / 7d)"
    )
    assert main(["audit", "--limit", "0"]) == 2
    assert main(["audit", "--tenant", "Bad Id"]) == 2
