"""``budgeter tenants apply``: a YAML file of policies, validated whole, planned, applied."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from budgeter.cli.commands import main
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.store.keys import TenantKeys
from budgeter.tenants.apply import (
    UNSET_VALUE,
    FieldDiff,
    TenantsFileError,
    apply,
    load_current,
    load_file,
    parse_text,
    plan,
    plan_lines,
    queued_jobs,
    summary_line,
)
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.store import TenantStore


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def errors_of(text: str) -> list[str]:
    with pytest.raises(TenantsFileError) as info:
        parse_text(yaml_text(text), "t.yaml")
    return info.value.problems


def P(**fields: Any) -> TenantPolicy:
    return TenantPolicy.model_validate(fields)


# the file -----------------------------------------------------------------------------


def test_file_is_parsed_into_policies_and_prune() -> None:
    desired = parse_text(
        yaml_text(
            """
            prune: true
            x-small: &small {budgets: {day: 1000}, rate: {rpm: 6}}
            tenants:
              acme: {weight: 2, budgets: {day: 2000000}}
              intern: *small
              demo: {<<: *small, weight: 0.5}
              free: {}
            """
        )
    )
    assert desired.prune is True
    assert desired.tenants == {
        "acme": P(weight=2, budgets={"day": 2000000}),
        "intern": P(budgets={"day": 1000}, rate={"rpm": 6}),
        "demo": P(budgets={"day": 1000}, rate={"rpm": 6}, weight=0.5),
        "free": P(),
    }
    assert parse_text("tenants: {}\n").prune is False


def test_every_error_is_reported_with_its_line_and_path() -> None:
    problems = errors_of(
        """
        tenants:
          acme:
            rate: {rpm: 0}
            budgets: {week: 5}
            colour: blue
          Bad Id: {}
          123: {}
          empty:
        prune: maybe
        extra: 1
        """
    )
    assert problems == [
        "t.yaml:3: tenants.acme.rate.rpm: Input should be greater than 0",
        "t.yaml:4: tenants.acme.budgets.week (key): "
        "Input should be 'minute', 'hour', 'day', 'month' or 'total'",
        "t.yaml:5: tenants.acme.colour: Extra inputs are not permitted",
        "t.yaml:6: tenants.Bad Id: invalid tenant id 'Bad Id': use 1-63 characters a-z, 0-9, "
        "'_' or '-', starting with a letter or digit",
        "t.yaml:7: tenants.123: a tenant id must be a string (quote it)",
        "t.yaml:8: tenants.empty: expected a policy mapping ({} for a tenant without limits)",
        "t.yaml:9: prune: Input should be a valid boolean",
        "t.yaml:10: extra: Extra inputs are not permitted",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "t.yaml: expected a mapping with a 'tenants' key, found an empty file"),
        ("- acme\n", "t.yaml: expected a mapping with a 'tenants' key, found a list"),
        ("just text\n", "t.yaml: expected a mapping with a 'tenants' key, found a str"),
        ("prune: true\n", "t.yaml: tenants: Field required"),
        ("tenants: [acme]\n", "t.yaml:1: tenants: Input should be a valid dictionary"),
        ("tenants:\n  a: {}\n  a: {}\n", "t.yaml:3:3: duplicate key 'a' (first on line 2)"),
        ("tenants: {a: {\n", "t.yaml:2:1: expected the node content, but found '<stream end>'"),
        ("tenants: {a: !!python/name:os.system {}}\n", "t.yaml:1:14: could not determine a"),
    ],
)
def test_a_bad_file_shape_is_one_line(text: str, expected: str) -> None:
    problems = errors_of(text)
    assert len(problems) == 1
    assert problems[0].startswith(expected)


def test_the_example_file_is_valid() -> None:
    example = load_file(Path(__file__).parents[2] / "examples" / "tenants.yaml")
    assert example.prune is False
    assert {"acme", "nightly-batch", "support-bot"} <= set(example.tenants)
    parents = {t: p.parent for t, p in example.tenants.items() if p.parent}  # the company tree
    assert parents == {
        "research": "example-corp",
        "research-vision": "research",
        "research-nlp": "research",
        "support": "example-corp",
        "support-emea": "support",
    }


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match=r"cannot read .*No such file"):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"tenants: {caf\xe9: {}}\n")
    with pytest.raises(TenantsFileError, match="not UTF-8 text"):
        load_file(tmp_path / "latin1.yaml")


# the plan -----------------------------------------------------------------------------


def test_plan_creates_updates_keeps_and_prunes() -> None:
    current = {
        "acme": P(budgets={"day": 2000000}, rate={"rpm": 600, "itpm": 400000}),
        "same": P(weight=2, budgets={"day": 5, "month": 9}),
        "old": P(),
    }
    desired = {
        "acme": P(budgets={"day": 3000000}, rate={"rpm": 600}, on_exhausted="wait"),
        # key order and fields spelled at their default make no difference
        "same": P(budgets={"month": 9, "day": 5}, weight=2.0, on_exhausted="reject"),
        "new": P(max_concurrency=4),
    }
    kept = plan(current, desired, prune=False)
    assert [(c.action, c.tenant) for c in kept] == [
        ("update", "acme"),
        ("create", "new"),
        ("orphan", "old"),
        ("unchanged", "same"),
    ]
    assert kept[0].diffs == (
        FieldDiff("budgets.day", 2000000, 3000000),
        FieldDiff("rate.itpm", 400000, UNSET_VALUE),
        FieldDiff("on_exhausted", "reject", "wait"),
    )
    assert [c.action for c in plan(current, desired, prune=True)] == [
        "update",
        "create",
        "delete",
        "unchanged",
    ]
    assert [text for text, _ in plan_lines(plan(current, desired, prune=True), {"old": 3})] == [
        "~ acme: update",
        "    ~ acme.budgets.day: 2000000 → 3000000",
        "    ~ acme.rate.itpm: 400000 → (unset)",
        '    ~ acme.on_exhausted: "reject" → "wait"',
        '+ new: create {"max_concurrency": 4}',
        "- old: delete (3 queued job(s) will end errored: tenant has no policy)",
    ]
    assert plan_lines(kept)[-1] == ("? old: not in the file, kept (prune would delete it)", "dim")
    assert summary_line(kept, dry_run=True) == (
        "Plan: 1 to create, 1 to update, 0 to delete, 1 unchanged. Dry run: nothing was changed."
    )
    assert plan(desired, desired, prune=True) == plan(desired, dict(desired), prune=False)
    assert summary_line(plan(desired, desired, prune=True), dry_run=False) == (
        "No changes: 3 tenant(s) already match the file."
    )


def test_a_new_parent_in_the_plan_says_only_future_charges_move() -> None:
    """As the API's and ``tenants set``'s answer (merge_patch.reparent_note): moving a
    tenant moves its future charges only; what it was charged stays where it was counted."""
    current = {"org": P(), "org2": P(), "team": P(parent="org"), "solo": P(weight=2)}
    desired = {
        "org": P(),
        "org2": P(),
        "team": P(parent="org2"),
        "solo": P(weight=2, parent="org"),
    }
    lines = [text for text, _ in plan_lines(plan(current, desired, prune=False))]
    assert lines == [
        "~ solo: update",
        '    ~ solo.parent: (unset) → "org"',
        "    note: moved from no parent to 'org': usage already charged stays counted where "
        "it was; only charges from now on count toward the new parent",
        "~ team: update",
        '    ~ team.parent: "org" → "org2"',
        "    note: moved from 'org' to 'org2': usage already charged stays counted where it "
        "was; only charges from now on count toward the new parent",
    ]
    # another field changing says nothing of the tree
    other = plan({"a": P(parent="org")}, {"a": P(parent="org", weight=3)}, prune=False)
    assert not any("note" in text for text, _ in plan_lines(other))


# against Redis ------------------------------------------------------------------------


async def test_apply_converges_and_is_idempotent(redis: Any) -> None:
    store = TenantStore(redis)
    await store.put("acme", P(budgets={"day": 2000000}))
    await store.put("old", P())
    first = parse_text(
        yaml_text(
            """
            prune: true
            tenants:
              acme: {budgets: {day: 3000000}}
              new: {rate: {rpm: 60}}
            """
        )
    )
    changes = plan(await load_current(store), first.tenants, prune=first.prune)
    assert await apply(store, changes) == {"create": 1, "update": 1, "delete": 1}
    assert await load_current(store) == first.tenants
    assert not await store.exists("old")
    again = plan(await load_current(store), first.tenants, prune=True)
    assert {c.action for c in again} == {"unchanged"}
    assert await apply(store, again) == {"create": 0, "update": 0, "delete": 0}


async def test_update_keeps_keys_queue_and_usage_prune_deletes_like_tenants_delete(
    redis: Any,
) -> None:
    store = TenantStore(redis)
    await store.put("acme", P(budgets={"day": 100}))
    await store.put("gone", P())
    key_id, key = await KeyStore(redis).create("acme")
    queue = JobQueue(redis)
    job = NewJob("q-1", {"model": "m", "max_tokens": 5, "messages": []})
    await queue.submit("acme", "b1", [job])
    await queue.submit("gone", "b2", [job, NewJob("q-2", job.params)])
    acme = TenantKeys.of("budgeter", "acme")
    await redis.hset(acme.budget, mapping={"day:used": 42})

    desired = {"acme": P(budgets={"day": 200})}
    changes = plan(await load_current(store), desired, prune=True)
    assert await queued_jobs(store, ["gone"]) == {"gone": 2}
    await apply(store, changes)

    assert await store.get("acme") == desired["acme"]
    principal = await KeyStore(redis).authenticate(key)
    assert principal is not None
    assert principal.key_id == key_id
    assert await redis.llen(acme.queue) == 1
    assert await redis.hget(acme.budget, "day:used") == "42"
    # the same effect as `budgeter tenants delete gone`: policy gone, still known to
    # maintenance, its queued jobs left for the workers to end as errored
    assert await store.list_ids() == ["acme"]
    assert await store.known() == ["acme", "gone"]
    assert await redis.llen(TenantKeys.of("budgeter", "gone").queue) == 2


# the command --------------------------------------------------------------------------


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sync_redis.Redis]:
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


def snapshot(client: sync_redis.Redis) -> dict[str, Any]:
    return {key: client.dump(key) for key in client.keys("*")}


def test_cli_dry_run_apply_and_exit_codes(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "set", "acme", "--policy", '{"budgets": {"day": 2000000}}']) == 0
    assert main(["tenants", "set", "legacy", "--policy", "{}"]) == 0
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml_text(
            """
            tenants:
              acme: {budgets: {day: 3000000}}
              beta: {weight: 2, rate: {rpm: 60}}
            """
        )
    )
    capsys.readouterr()
    before = snapshot(env)
    assert main(["tenants", "apply", str(path), "--dry-run"]) == 0
    assert snapshot(env) == before
    assert capsys.readouterr().out.splitlines() == [
        "~ acme: update",
        "    ~ acme.budgets.day: 2000000 → 3000000",
        '+ beta: create {"weight": 2.0, "rate": {"rpm": 60}}',
        "? legacy: not in the file, kept (prune would delete it)",
        "Plan: 1 to create, 1 to update, 0 to delete, 0 unchanged. Dry run: nothing was changed.",
    ]
    assert main(["tenants", "apply", str(path), "--dry-run", "--prune", "--exit-code"]) == 1
    assert "- legacy: delete" in capsys.readouterr().out
    assert snapshot(env) == before

    assert main(["tenants", "apply", str(path), "--prune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "Applied: 1 created, 1 updated, 1 deleted, 0 unchanged."
    assert env.hget("budgeter:{t:acme}:policy", "budget:day") == "3000000"
    assert env.hget("budgeter:{t:beta}:policy", "rate:rpm") == "60"
    assert not env.exists("budgeter:{t:legacy}:policy")

    after = snapshot(env)
    assert main(["tenants", "apply", str(path), "--prune", "--exit-code"]) == 0
    assert capsys.readouterr().out == "No changes: 2 tenant(s) already match the file.\n"
    assert snapshot(env) == after


@pytest.mark.usefixtures("env")
def test_cli_apply_moving_a_tenant_says_only_future_charges_move(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for tenant, policy in (("org", "{}"), ("org2", "{}"), ("team", '{"parent": "org"}')):
        assert main(["tenants", "set", tenant, "--policy", policy]) == 0
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  org: {}\n  org2: {}\n  team: {parent: org2}\n")
    capsys.readouterr()
    for flags in (["--dry-run"], []):
        assert main(["tenants", "apply", str(path), *flags]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[:3] == [
            "~ team: update",
            '    ~ team.parent: "org" → "org2"',
            "    note: moved from 'org' to 'org2': usage already charged stays counted where "
            "it was; only charges from now on count toward the new parent",
        ]
    assert main(["tenants", "get", "team"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == "org2"


def test_cli_prune_from_the_file_and_no_prune_flag(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "set", "legacy", "--policy", "{}"]) == 0
    path = tmp_path / "tenants.yaml"
    path.write_text("prune: true\ntenants: {}\n")
    assert main(["tenants", "apply", str(path), "--no-prune"]) == 0
    assert env.exists("budgeter:{t:legacy}:policy")
    assert main(["tenants", "apply", str(path)]) == 0
    assert not env.exists("budgeter:{t:legacy}:policy")
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "- legacy: delete",
        "Applied: 0 created, 0 updated, 1 deleted, 0 unchanged.",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants:\n  acme:\n    rate: {rpm: 0}\n", "3: tenants.acme.rate.rpm: Input should be"),
        ("tenants:\n  acme: {colour: blue}\n", "2: tenants.acme.colour: Extra inputs are not"),
        ("tenants:\n  Acme: {}\n", "2: tenants.Acme: invalid tenant id 'Acme'"),
        ("[1, 2]\n", " expected a mapping with a 'tenants' key, found a list"),
    ],
)
def test_cli_invalid_file_is_one_line_and_touches_nothing(
    env: sync_redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    assert main(["tenants", "set", "acme", "--policy", '{"budgets": {"day": 5}}']) == 0
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    capsys.readouterr()
    before = snapshot(env)
    assert main(["tenants", "apply", str(path), "--prune"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"budgeter: error: {path}:")
    assert message in captured.err
    assert len(captured.err.splitlines()) == 1
    assert snapshot(env) == before


def test_cli_refuses_a_stored_policy_it_cannot_read(
    env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.hset("budgeter:{t:acme}:policy", "json", '{"from_the_future": 1}')
    env.sadd("budgeter:{sched}:tenants", "acme")
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: {acme: {}}\n")
    before = snapshot(env)
    assert main(["tenants", "apply", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stored policy of tenant 'acme' is not readable" in err
    assert "nothing was applied" in err
    assert snapshot(env) == before
