"""The operator CLI against a real Redis: one-line errors, nothing half-enqueued."""

from __future__ import annotations

import json
import subprocess
import sys
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


def line(custom_id: str, **params: object) -> str:
    body = {
        "model": "claude-test",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        **params,
    }
    return json.dumps({"custom_id": custom_id, "params": body})


@pytest.mark.usefixtures("env")
def test_tenants_set_get_list_delete(capsys: pytest.CaptureFixture[str]) -> None:
    policy = '{"weight": 2, "budgets": {"day": 1000}, "rate": {"rpm": 10}}'
    assert main(["tenants", "set", "acme", "--policy", policy]) == 0
    assert main(["tenants", "get", "acme"]) == 0
    assert main(["tenants", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[1]) == {"weight": 2.0, "budgets": {"day": 1000}, "rate": {"rpm": 10}}
    assert json.loads(out[2])["tenant"] == "acme"
    assert main(["tenants", "delete", "acme"]) == 0
    assert main(["tenants", "get", "acme"]) == 2


@pytest.mark.usefixtures("env")
def test_policy_from_file_and_bad_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"budgets": {"month": 5}}')
    assert main(["tenants", "set", "acme", "--policy", f"@{path}"]) == 0
    capsys.readouterr()
    assert main(["tenants", "set", "acme", "--policy", '{"budgets": {"week": 5}}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budgeter: error: invalid policy: budgets.week")
    assert len(err.splitlines()) == 1
    assert main(["tenants", "set", "acme", "--policy", "{not json"]) == 2
    assert main(["tenants", "set", "Bad Tenant", "--policy", "{}"]) == 2
    assert "invalid tenant id" in capsys.readouterr().err


def test_bad_submit_file_reports_every_bad_line_and_queues_nothing(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "set", "acme", "--policy", "{}"]) == 0
    before = env.dbsize()
    path = tmp_path / "batch.jsonl"
    path.write_text(
        "\n".join(
            [
                line("ok-1"),
                "{broken json",
                line("bad id!"),
                line("ok-2", max_tokens=0),
                line("ok-1"),
                json.dumps({"custom_id": "x", "params": {"model": "m", "max_tokens": 5}}),
            ]
        )
        + "\n"
    )
    capsys.readouterr()
    assert main(["submit", "--tenant", "acme", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [e.split(":")[2] for e in err[:-1]] == ["2", "3", "4", "5", "6"]
    assert "invalid JSON" in err[0]
    assert "custom_id" in err[1]
    assert "max_tokens" in err[2]
    assert "already used on line 1" in err[3]
    assert "messages" in err[4]
    assert "nothing was submitted" in err[-1]
    assert env.dbsize() == before


def test_submit_unknown_tenant_and_missing_file(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text(line("a") + "\n")
    assert main(["submit", "--tenant", "ghost", str(path)]) == 2
    assert "has no policy" in capsys.readouterr().err
    assert env.dbsize() == 0
    assert main(["submit", "--tenant", "ghost", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_submit_is_idempotent_with_batch_id(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "set", "acme", "--policy", "{}"]) == 0
    path = tmp_path / "b.jsonl"
    path.write_text(line("a") + "\n" + line("b") + "\n")
    assert main(["submit", "--tenant", "acme", "--batch-id", "msgbatch_fixed", str(path)]) == 0
    assert main(["submit", "--tenant", "acme", "--batch-id", "msgbatch_fixed", str(path)]) == 0
    assert env.llen("budgeter:{t:acme}:queue") == 2
    assert capsys.readouterr().out.split()[-2:] == ["msgbatch_fixed", "msgbatch_fixed"]


@pytest.mark.usefixtures("env")
def test_results_and_usage_of_unknown_things(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", "msgbatch_nope"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["usage", "--tenant", "ghost"]) == 2


def test_bad_setting_stops_with_one_line_naming_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "budgeter", "tenants", "list"],
        env={"BUDGETER_REDIS_URL": "http://nope", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "budgeter: error: BUDGETER_REDIS_URL: Value error, must start with redis://, "
        "rediss://, unix://, redis+cluster:// or redis+sentinel://"
    ]


def test_submit_tags_the_batch_and_refuses_a_bad_tag_in_one_line(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tags`` is the API's ``budgeter-tags`` header for a batch: every job's ledger
    entry carries them (the chargeback walk-through in the README)."""
    assert main(["tenants", "set", "acme", "--policy", "{}"]) == 0
    path = tmp_path / "b.jsonl"
    path.write_text(line("a") + "\n")
    args = ["submit", "--tenant", "acme", "--tags", "team=search,feature=rerank", str(path)]
    assert main(args) == 0
    batch_id = capsys.readouterr().out.split()[-1]
    tags = env.hget(f"budgeter:{{t:acme}}:batch:{batch_id}", "tags")
    assert json.loads(str(tags)) == {"team": "search", "feature": "rerank"}

    bad = ["submit", "--tenant", "acme", "--tags", "Team=x", str(path)]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budgeter: error: --tags: tag 'Team'") and len(err.splitlines()) == 1
    assert env.llen("budgeter:{t:acme}:queue") == 1  # the first batch's job only
