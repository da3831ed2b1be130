"""The official anthropic SDK (newest 2.x in the venv, 1.x beside it) against real
processes: budgeter api + 2 budgeter workers + budgeter mock-upstream, on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import pytest
import redis as sync_redis

from tests.helpers import listen_args, read_port_blocking

SDK1_PATH = Path(
    os.environ.get("SDK1_PATH", Path(__file__).resolve().parents[2] / ".venv" / "sdk1")
)
ADMIN_TOKEN = "sdk-admin-token"
PREFIX = "sdkt"


@dataclass
class Stack:
    api_url: str
    keys: dict[str, str]
    redis_url: str

    def client(self, tenant: str, **kwargs: object) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.api_url,
            api_key=self.keys[tenant],
            max_retries=0,
            **kwargs,  # type: ignore[arg-type]
        )


def _wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sync_redis.Redis.from_url(redis_url).flushall()
    port_dir = tmp_path_factory.mktemp("sdk-ports")
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BUDGETER_KEY_PREFIX": PREFIX,
        "BUDGETER_API_MAX_BODY_MB": "2",
        "BUDGETER_LOG_LEVEL": "WARNING",
        "BUDGETER_DATA_DIR": str(tmp_path_factory.mktemp("sdk-data")),
    }
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str) -> int:
        port_file = port_dir / f"{name}.port"
        args = [sys.executable, "-m", "budgeter", *command, *listen_args(port_file)]
        procs.append(subprocess.Popen(args, env=env))
        return read_port_blocking(port_file, procs[-1])

    try:
        mock_port = start("mock", "mock-upstream")
        env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_port}"
        api_port = start("api", "api")
        start("w1", "worker", "--concurrency", "16")
        start("w2", "worker", "--concurrency", "16")
        api_url = f"http://127.0.0.1:{api_port}"
        _wait_http(f"http://127.0.0.1:{mock_port}/healthz")
        _wait_http(f"{api_url}/healthz")
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        policies = {
            "sdk-a": {"budgets": {"day": 50_000_000}},
            "sdk-b": {},
            "sdk-slow": {"rate": {"rpm": 1}},
            "sdk-orphan": {},
        }
        keys = {}
        for tenant, policy in policies.items():
            httpx.put(
                f"{api_url}/admin/tenants/{tenant}", json=policy, headers=admin
            ).raise_for_status()
            answer = httpx.post(f"{api_url}/admin/tenants/{tenant}/keys", headers=admin)
            keys[tenant] = answer.json()["key"]
        yield Stack(api_url, keys, redis_url)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(60) == 0


def requests(n: int, prefix: str = "r", max_tokens: int = 32) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "params": {
                "model": "claude-sonnet-4-6",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(n)
    ]


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout_s: float = 180) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.1)
    raise TimeoutError(batch_id)


def test_sdk2_thousand_requests_end_to_end(stack: Stack) -> None:
    client = stack.client("sdk-a")
    batch = client.messages.batches.create(requests=requests(1000))  # type: ignore[arg-type]
    assert batch.type == "message_batch" and batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 1000
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.succeeded == 1000  # type: ignore[attr-defined]
    assert ended.results_url == f"{stack.api_url}/v1/messages/batches/{batch.id}/results"  # type: ignore[attr-defined]
    results = list(client.messages.batches.results(batch.id))
    assert len(results) == 1000
    assert {r.custom_id for r in results} == {f"r-{i}" for i in range(1000)}
    assert all(r.result.type == "succeeded" for r in results)
    first = results[0].result
    assert first.type == "succeeded" and first.message.usage.output_tokens >= 1


def test_sdk2_lifecycle_with_bearer_auth(stack: Stack) -> None:
    client = anthropic.Anthropic(
        base_url=stack.api_url, auth_token=stack.keys["sdk-b"], api_key=None, max_retries=0
    )
    batch = client.messages.batches.create(requests=requests(3, "life"))  # type: ignore[arg-type]
    assert client.messages.batches.retrieve(batch.id).id == batch.id
    wait_ended(client, batch.id)
    listed = [b.id for b in client.messages.batches.list(limit=1)]
    assert batch.id in listed
    results = {r.custom_id: r.result.type for r in client.messages.batches.results(batch.id)}
    assert results == {"life-0": "succeeded", "life-1": "succeeded", "life-2": "succeeded"}
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_sdk2_pagination(stack: Stack) -> None:
    client = stack.client("sdk-b")
    made = [client.messages.batches.create(requests=requests(1, f"p{i}")).id for i in range(5)]  # type: ignore[arg-type]
    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == list(reversed(made))[:2] and page.has_more
    seen = [b.id for b in client.messages.batches.list(limit=2)]  # auto-pagination
    assert seen[:5] == list(reversed(made))


def test_sdk2_cancel(stack: Stack) -> None:
    client = stack.client("sdk-slow")  # 1 rpm: everything after the first request waits
    batch = client.messages.batches.create(requests=requests(10, "c"))  # type: ignore[arg-type]
    canceled = client.messages.batches.cancel(batch.id)
    assert canceled.processing_status in ("canceling", "ended")
    assert canceled.cancel_initiated_at is not None
    ended = wait_ended(client, batch.id, timeout_s=60)
    counts = ended.request_counts  # type: ignore[attr-defined]
    assert counts.canceled >= 8 and counts.canceled + counts.succeeded == 10
    types = {r.result.type for r in client.messages.batches.results(batch.id)}
    assert "canceled" in types


def test_sdk2_errors_are_the_sdk_exception_classes(stack: Stack) -> None:
    client = stack.client("sdk-a")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=stack.api_url, api_key="sk-bgt-nope", max_retries=0
        ).messages.batches.list()
    other = stack.client("sdk-b").messages.batches.create(requests=requests(1, "o"))  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(other.id)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.batches.create(requests=requests(1, "bad", max_tokens=0))  # type: ignore[arg-type]
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.create(requests=requests(1, "dup") * 2)  # type: ignore[arg-type]
    slow = stack.client("sdk-slow").messages.batches.create(requests=requests(3, "s"))  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        stack.client("sdk-slow").messages.batches.delete(slow.id)
    huge = requests(1, "huge")
    huge[0]["params"]["messages"][0]["content"] = "x" * (3 * 1024 * 1024)  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as too_large:
        client.messages.batches.create(requests=huge)  # type: ignore[arg-type]
    assert too_large.value.status_code == 413
    sync_redis.Redis.from_url(stack.redis_url).delete(f"{PREFIX}:{{t:sdk-orphan}}:policy")
    with pytest.raises(anthropic.NotFoundError):  # every route: a missing tenant is 404
        stack.client("sdk-orphan").messages.batches.create(requests=requests(1, "x"))  # type: ignore[arg-type]


SDK1_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import anthropic
    assert anthropic.__version__.startswith("1."), anthropic.__version__
    base, key, other_key = sys.argv[1], sys.argv[2], sys.argv[3]
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    reqs = [{"custom_id": f"v1-{i}", "params": {"model": "m", "max_tokens": 16,
             "messages": [{"role": "user", "content": f"q{i}"}]}} for i in range(4)]
    batch = client.messages.batches.create(requests=reqs)
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        time.sleep(0.1)
    out = {"version": anthropic.__version__,
           "results": sorted((r.custom_id, r.result.type) for r in client.messages.batches.results(batch.id)),
           "listed": batch.id in [b.id for b in client.messages.batches.list(limit=50)]}
    errors = {}
    for name, call in [
        ("auth", lambda: anthropic.Anthropic(base_url=base, api_key="bad", max_retries=0).messages.batches.list()),
        ("not_found", lambda: anthropic.Anthropic(base_url=base, api_key=other_key, max_retries=0).messages.batches.retrieve(batch.id)),
        ("bad_request", lambda: client.messages.batches.create(requests=[{"custom_id": "x y", "params": {}}])),
    ]:
        try:
            call()
        except anthropic.APIStatusError as exc:
            errors[name] = type(exc).__name__
    out["errors"] = errors
    out["deleted"] = client.messages.batches.delete(batch.id).type
    print(json.dumps(out))
    """
)


def test_sdk1_lifecycle_and_errors(stack: Stack, tmp_path: Path) -> None:
    assert (SDK1_PATH / "anthropic").is_dir(), (
        f"anthropic 1.x missing at {SDK1_PATH}: run make test"
    )
    script = tmp_path / "sdk1.py"
    script.write_text(SDK1_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), stack.api_url, stack.keys["sdk-b"], stack.keys["sdk-a"]],
        env={**os.environ, "PYTHONPATH": str(SDK1_PATH)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["version"].startswith("1.")
    assert out["results"] == [[f"v1-{i}", "succeeded"] for i in range(4)]
    assert out["listed"] and out["deleted"] == "message_batch_deleted"
    assert out["errors"] == {
        "auth": "AuthenticationError",
        "not_found": "NotFoundError",
        "bad_request": "BadRequestError",
    }
