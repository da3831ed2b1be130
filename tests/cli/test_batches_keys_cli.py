"""``budgeter batches ...`` and ``budgeter keys ...`` as users run them: real
subprocesses (``python -m budgeter``) against the test Redis, and a real ``budgeter api``
process whose answers the CLI's must equal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from budgeter.cli.commands import main
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for, start_budgeter

ADMIN_TOKEN = "cli-admin-token"
PUBLIC_URL = "http://budgeter.test:8080"


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budgeter",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(env: dict[str, str], *args: str) -> Any:
    """The JSON a command that succeeded printed."""
    code, out, err = await run(env, *args)
    assert code == 0, f"{args}: {err}"
    assert err == "", err
    return json.loads(out)


async def fails(env: dict[str, str], *args: str) -> str:
    """The one line a command that failed printed (status 2, nothing on stdout)."""
    code, out, err = await run(env, *args)
    assert (code, out) == (2, ""), f"{args}: {code} {out!r} {err!r}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_DATA_DIR": str(tmp_path / "data"),
        "BUDGETER_LOG_LEVEL": "WARNING",
        "BUDGETER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BUDGETER_PUBLIC_URL": PUBLIC_URL,
    }


@pytest.fixture
async def api(env: dict[str, str], tmp_path: Path) -> AsyncIterator[str]:
    """A real ``budgeter api`` on a free loopback port (its upstream is never called)."""
    proc, port = await start_budgeter("api", port_dir=tmp_path, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with session.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_batches_list_get_cancel_delete_answer_as_the_api(
    env: dict[str, str], redis: Redis, api: str
) -> None:
    for name in ("acme", "other"):
        await TenantStore(redis).put(name, TenantPolicy())
    _, key = await KeyStore(redis).create("acme")
    batches = BatchStore(redis)
    ids = []  # oldest first
    for name in ("a", "b", "c"):
        ids.append(await batches.create("acme", requests_for(name, 2)))
        await asyncio.sleep(0.002)  # distinct creation times (ms): a stable order
    tenant = ("--tenant", "acme")

    page = await ok(env, "batches", "list", *tenant, "--limit", "2")
    assert [b["id"] for b in page["data"]] == ids[:0:-1] and page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (ids[2], ids[1])
    rest = await ok(env, "batches", "list", *tenant, "--after-id", page["last_id"])
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
    newer = await ok(env, "batches", "list", *tenant, "--before-id", ids[0], "--limit", "1")
    assert [b["id"] for b in newer["data"]] == [ids[1]] and newer["has_more"] is True
    assert (await ok(env, "batches", "list", "--tenant", "other"))["data"] == []

    auth = {"x-api-key": key}
    async with aiohttp.ClientSession() as session:
        for query, flags in (("", ()), ("?limit=2", ("--limit", "2"))):
            answer = await get_json(session, f"{api}/v1/messages/batches{query}", auth)
            assert await ok(env, "batches", "list", *tenant, *flags) == answer
        batch = await ok(env, "batches", "get", *tenant, ids[0])
        assert batch == await get_json(session, f"{api}/v1/messages/batches/{ids[0]}", auth)
    assert batch["processing_status"] == "in_progress"
    assert batch["request_counts"]["processing"] == 2

    assert "still processing" in await fails(env, "batches", "delete", *tenant, ids[0])
    canceled = await ok(env, "batches", "cancel", *tenant, ids[0])
    assert canceled["type"] == "message_batch" and canceled["processing_status"] == "ended"
    assert canceled["request_counts"]["canceled"] == 2
    assert canceled["results_url"] == f"{PUBLIC_URL}/v1/messages/batches/{ids[0]}/results"
    custom = await ok(env, "batches", "get", *tenant, ids[0], "--base-url", "http://x.test/")
    assert custom["results_url"] == f"http://x.test/v1/messages/batches/{ids[0]}/results"
    deleted = await ok(env, "batches", "delete", *tenant, ids[0])
    assert deleted == {"id": ids[0], "type": "message_batch_deleted"}
    gone = await fails(env, "batches", "get", *tenant, ids[0])
    assert gone == f"budgeter: error: batch {ids[0]!r} not found (tenant 'acme')"


async def test_keys_create_list_revoke(env: dict[str, str], redis: Redis, api: str) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    created = await ok(env, "keys", "create", "acme")
    assert set(created) == {"id", "key", "tenant", "name", "limits"}
    assert created["tenant"] == "acme" and created["limits"] is None
    assert created["key"].startswith("sk-bgt-")
    second = await ok(env, "keys", "create", "acme")

    listed = await ok(env, "keys", "list", "acme", "--json")
    assert [k["id"] for k in listed["data"]] == [created["id"], second["id"]]
    assert all(k["last_used_at_ms"] is None for k in listed["data"])
    code, text, _ = await run(env, "keys", "list", "acme")
    assert code == 0 and len(text.splitlines()) == 2
    assert created["id"] in text and "last used: never" in text and "created: 20" in text
    for shown in (json.dumps(listed), text):  # never the key, nor its hash
        assert created["key"] not in shown and second["key"] not in shown
        assert '"hash"' not in shown

    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        assert await get_json(session, f"{api}/admin/tenants/acme/keys", admin) == listed
        await get_json(session, f"{api}/v1/usage", {"x-api-key": created["key"]})
        used = await ok(env, "keys", "list", "acme", "--json")
        assert await get_json(session, f"{api}/admin/tenants/acme/keys", admin) == used
        first = used["data"][0]
        assert first["last_used_at_ms"] >= first["created_at_ms"]
        assert used["data"][1]["last_used_at_ms"] is None
        assert "last used: 20" in (await run(env, "keys", "list", "acme"))[1]

        revoked = await ok(env, "keys", "revoke", "acme", created["id"])
        assert revoked == {"id": created["id"], "revoked": True}
        async with session.get(f"{api}/v1/usage", headers={"x-api-key": created["key"]}) as r:
            assert r.status == 401
    assert [k["id"] for k in (await KeyStore(redis).list_keys("acme"))] == [second["id"]]
    again = await fails(env, "keys", "revoke", "acme", created["id"])
    assert again == f"budgeter: error: key {created['id']!r} of tenant 'acme' not found"


@pytest.fixture
def cli_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sync_redis.Redis]:
    """The CLI in this process (``main``), on the test Redis, flushed."""
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2, args
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    assert "Traceback" not in captured.err
    return captured.err.strip()


def test_missing_tenants_batches_and_keys_and_bad_input_are_one_line(
    cli_redis: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("acme", "other"):
        assert main(["tenants", "set", name, "--policy", "{}"]) == 0
    path = tmp_path / "a.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in requests_for("a", 1)))
    assert main(["submit", "--tenant", "acme", str(path)]) == 0
    batch_id = capsys.readouterr().out.split()[-1]
    before = {key: cli_redis.dump(key) for key in sorted(cli_redis.keys("*"))}

    err = one_line_error
    for action in ("get", "cancel", "delete"):
        assert "not found" in err(capsys, "batches", action, "--tenant", "other", batch_id)
        assert "not found" in err(capsys, "batches", action, "--tenant", "acme", "msgbatch_x")
    missing = "budgeter: error: tenant 'ghost' not found"
    assert err(capsys, "batches", "list", "--tenant", "ghost") == missing
    assert err(capsys, "batches", "get", "--tenant", "ghost", batch_id) == missing
    assert "invalid tenant id" in err(capsys, "batches", "list", "--tenant", "Bad Id")
    acme = ("--tenant", "acme")
    assert "not found" in err(capsys, "batches", "list", *acme, "--after-id", "nope")
    both = err(capsys, "batches", "list", *acme, "--after-id", "a", "--before-id", "b")
    assert "cannot be used together" in both
    try:
        code = main(["batches", "list", *acme, "--limit", "0"])
    except SystemExit as exc:  # argparse's own exit
        code = int(exc.code or 0)
    assert code == 2 and "--limit" in capsys.readouterr().err
    for action in (("create", "ghost"), ("list", "ghost"), ("revoke", "ghost", "key_x")):
        assert err(capsys, "keys", *action) == missing
    assert "invalid tenant id" in err(capsys, "keys", "list", "Bad Id")
    assert "not found" in err(capsys, "keys", "revoke", "acme", "key_nope")
    assert {key: cli_redis.dump(key) for key in sorted(cli_redis.keys("*"))} == before

    assert main(["keys", "list", "acme"]) == 0
    assert capsys.readouterr().out.strip() == "tenant 'acme' has no keys"


async def test_every_flag_of_the_new_commands_has_help(env: dict[str, str]) -> None:
    code, out, _ = await run(env, "batches", "list", "--help")
    assert code == 0
    assert "--limit LIMIT" in out and "(default: 20)" in " ".join(out.split())
    assert "BUDGETER_PUBLIC_URL" in out
    code, out, _ = await run(env, "keys", "--help")
    assert code == 0 and "create" in out and "revoke" in out
