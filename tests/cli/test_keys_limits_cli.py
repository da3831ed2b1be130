"""``budgeter keys create TENANT --name N --limits JSON|@FILE`` in this process (``main``)
on the test Redis: the key shown once, its limits stored as the API stores them, bad limits
one line naming the field with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis as sync_redis

from budgeter.cli.commands import main
from budgeter.domain.key_limits import KeyLimits
from budgeter.store.keys import KeyScopeKeys, TenantKeys
from tests.cli.test_batches_keys_cli import cli_redis, one_line_error  # noqa: F401 - fixture


def test_keys_create_with_a_name_and_limits_inline_or_from_a_file(
    cli_redis: sync_redis.Redis,  # noqa: F811 - the fixture
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tenants", "set", "team", "--policy", '{"budgets": {"day": 100000}}']) == 0
    capsys.readouterr()
    limits = {"budgets": {"day": 5000}, "allowed_models": ["claude-haiku-4-5"]}
    assert main(["keys", "create", "team", "--name", "alice", "--limits", json.dumps(limits)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert set(created) == {"id", "key", "tenant", "name", "limits"}
    assert created["name"] == "alice"
    assert KeyLimits.model_validate(created["limits"]) == KeyLimits.model_validate(limits)
    scope = KeyScopeKeys("budgeter", "team", created["id"])
    assert cli_redis.hgetall(scope.policy) == KeyLimits.model_validate(limits).redis_fields()
    path = tmp_path / "limits.json"
    path.write_text('{"rate": {"rpm": 5}}')
    assert main(["keys", "create", "team", "--limits", f"@{path}"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["limits"]["rate"]["rpm"] == 5 and second["name"] is None
    limited = TenantKeys.of("budgeter", "team").limited_keys
    assert cli_redis.smembers(limited) == {created["id"], second["id"]}

    assert main(["keys", "list", "team", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["data"]
    assert [k["name"] for k in listed] == ["alice", None]
    assert listed[0]["limits"] == created["limits"] and listed[0]["usage"][0]["used"] == 0
    assert created["key"] not in json.dumps(listed)
    assert main(["keys", "list", "team"]) == 0
    text = capsys.readouterr().out
    assert "name: alice" in text and '"day": 5000' in text and created["key"] not in text

    assert main(["keys", "revoke", "team", created["id"]]) == 0
    capsys.readouterr()
    assert cli_redis.exists(scope.policy) == 0
    assert cli_redis.smembers(limited) == {second["id"]}


def test_bad_limits_are_one_line_naming_the_field_and_write_nothing(
    cli_redis: sync_redis.Redis,  # noqa: F811 - the fixture
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tenants", "set", "team", "--policy", "{}"]) == 0
    capsys.readouterr()
    before = {key: cli_redis.dump(key) for key in sorted(cli_redis.keys("*"))}
    err = one_line_error
    create = ("keys", "create", "team")
    assert "limits.budgets.day" in err(capsys, *create, "--limits", '{"budgets": {"day": 0}}')
    assert "limits.weight" in err(capsys, *create, "--limits", '{"weight": 2}')
    assert "invalid limits: invalid JSON" in err(capsys, *create, "--limits", "{nope")
    assert "cannot read limits file" in err(capsys, *create, "--limits", f"@{tmp_path}/none")
    assert "name" in err(capsys, *create, "--name", "")
    assert {key: cli_redis.dump(key) for key in sorted(cli_redis.keys("*"))} == before


def test_the_example_company_tree_applies_and_its_key_command_runs(
    cli_redis: sync_redis.Redis,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shlex

    example = Path(__file__).resolve().parents[2] / "examples" / "tenants.yaml"
    assert main(["tenants", "apply", str(example)]) == 0
    capsys.readouterr()
    text = example.read_text()
    start = text.index("#   budgeter keys create")
    command = text[start:].split("\n#\n")[0]
    joined = " ".join(line.lstrip("#").strip() for line in command.splitlines())
    argv = shlex.split(joined.replace("\\ ", " "))
    assert argv[:3] == ["budgeter", "keys", "create"]
    assert main(argv[1:]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["tenant"] == "research-nlp" and created["limits"]["budgets"]["day"] == 200000
    assert cli_redis.hget("budgeter:{tree}:parents", "research-nlp") == "research"
