"""Real clients against real processes on loopback: ``budgeter api`` + a worker + the strict
``budgeter mock-upstream``. The TypeScript SDK (``@anthropic-ai/sdk``) and Claude Code
(``@anthropic-ai/claude-code``, print mode) are installed from the npm registry into
``.cache/node-clients/`` once (versions pinned in ``tests/system/clients/package.json``);
langchain-anthropic comes with the dev extra.

Without ``npm`` the node tests skip, unless ``BUDGETER_REQUIRE_NODE=1`` (``.ci/run`` sets
it), which turns the skip into a failure. The strict mock refuses what the real API
refuses (a beta-only field without its beta, ...), so these tests also prove budgeter
passes the clients' requests through faithfully; ``/mock/requests`` shows what arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from budgeter.upstream.mock_record import fingerprint
from tests.helpers import listen_args, read_port_blocking

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
NODE_CACHE = Path(os.environ.get("BUDGETER_NODE_CLIENTS", ROOT / ".cache" / "node-clients"))
ADMIN_TOKEN = "real-clients-admin"
UPSTREAM_KEY = "real-clients-upstream-key"
PREFIX = "rcl"
MODEL = "claude-sonnet-4-6"
TENANTS = ("ts-sdk", "claude-code", "langchain")


@dataclass
class Stack:
    api_url: str
    mock_url: str
    keys: dict[str, str]

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def received(self, path: str | None = None) -> list[dict[str, object]]:
        params = {"path": path} if path else {}
        answer = httpx.get(f"{self.mock_url}/mock/requests", params=params, timeout=10)
        answer.raise_for_status()
        records: list[dict[str, object]] = answer.json()["requests"]
        return records

    def forget(self) -> None:
        httpx.delete(f"{self.mock_url}/mock/requests", timeout=10).raise_for_status()

    def used_tokens(self, tenant: str) -> int:
        answer = httpx.get(
            f"{self.api_url}/admin/tenants/{tenant}/usage", headers=self.admin(), timeout=10
        )
        answer.raise_for_status()
        usage = answer.json()
        return sum(int(row.get("used", 0)) for row in usage.get("budgets", []))


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
    port_dir = tmp_path_factory.mktemp("real-client-ports")
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BUDGETER_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "BUDGETER_KEY_PREFIX": PREFIX,
        "BUDGETER_LOG_LEVEL": "WARNING",
        "BUDGETER_DATA_DIR": str(tmp_path_factory.mktemp("real-client-data")),
    }
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str) -> int:
        port_file = port_dir / f"{name}.port"
        args = [sys.executable, "-m", "budgeter", *command, *listen_args(port_file)]
        procs.append(subprocess.Popen(args, env=env))
        return read_port_blocking(port_file, procs[-1])

    try:
        mock_port = start("mock", "mock-upstream")  # strict: the default
        mock_url = f"http://127.0.0.1:{mock_port}"
        env["BUDGETER_UPSTREAM_URL"] = mock_url
        api_url = f"http://127.0.0.1:{start('api', 'api')}"
        start("worker", "worker", "--concurrency", "8")
        _wait_http(f"{mock_url}/healthz")
        _wait_http(f"{api_url}/healthz")
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        keys = {}
        for tenant in TENANTS:
            policy = {"budgets": {"day": 50_000_000}, "rate": {"rpm": 6000}}
            httpx.put(
                f"{api_url}/admin/tenants/{tenant}", json=policy, headers=admin
            ).raise_for_status()
            answer = httpx.post(f"{api_url}/admin/tenants/{tenant}/keys", headers=admin)
            answer.raise_for_status()
            keys[tenant] = answer.json()["key"]
        yield Stack(api_url, mock_url, keys)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(60) == 0


def _assert_upstream_saw_only_budgeter_key(records: list[dict[str, object]]) -> None:
    """Towards the upstream budgeter sends its own key in x-api-key, never a tenant's."""
    for record in records:
        headers = record["headers"]
        assert isinstance(headers, dict)
        assert headers.get("x-api-key") == fingerprint(UPSTREAM_KEY), record["path"]
        assert "authorization" not in headers, record["path"]


# --- node clients: installed once into .cache/node-clients ---------------------------------


def _require_node() -> str:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        if os.environ.get("BUDGETER_REQUIRE_NODE") == "1":
            pytest.fail("node/npm are not installed and BUDGETER_REQUIRE_NODE=1")
        pytest.skip("node/npm are not installed (BUDGETER_REQUIRE_NODE=1 makes this fail)")
    return npm


@pytest.fixture(scope="module")
def node_clients() -> Path:
    """``.cache/node-clients`` with the pinned packages of ``clients/package.json``,
    (re)installed with ``npm install --prefix`` when the pins changed."""
    npm = _require_node()
    wanted = (CLIENTS_DIR / "package.json").read_text()
    stamp = NODE_CACHE / ".installed-package.json"
    claude = NODE_CACHE / "node_modules" / ".bin" / "claude"
    if not (stamp.exists() and stamp.read_text() == wanted and claude.exists()):
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        (NODE_CACHE / "package.json").write_text(wanted)
        install = subprocess.run(
            [npm, "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert install.returncode == 0, f"npm install failed:\n{install.stderr[-3000:]}"
        stamp.write_text(wanted)
    return NODE_CACHE


def _run_sdk_step(stack: Stack, node_clients: Path, step: str) -> dict[str, object]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "NODE_PATH": str(node_clients / "node_modules"),
        "BUDGETER_URL": stack.api_url,
        "TENANT_KEY": stack.keys["ts-sdk"],
        "MODEL": MODEL,
    }
    done = subprocess.run(
        ["node", str(CLIENTS_DIR / "sdk_driver.cjs"), step],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"{done.stdout}\n{done.stderr}"
    result: dict[str, object] = lines[0]
    assert result["ok"] is True, f"{step}: {result}\n{done.stderr[-2000:]}"
    assert done.returncode == 0, done.stderr
    return result


def test_ts_sdk_messages_create_and_stream(node_clients: Path, stack: Stack) -> None:
    created = _run_sdk_step(stack, node_clients, "create")
    assert created["type"] == "message" and created["text"]
    streamed = _run_sdk_step(stack, node_clients, "stream")
    assert streamed["streamed"] == streamed["text"] != ""
    assert streamed["stop_reason"] in ("end_turn", "max_tokens")


def test_ts_sdk_count_tokens(node_clients: Path, stack: Stack) -> None:
    counted = _run_sdk_step(stack, node_clients, "count_tokens")
    assert isinstance(counted["input_tokens"], int) and counted["input_tokens"] > 0


def test_ts_sdk_beta_messages_reach_the_upstream_with_their_beta(
    node_clients: Path, stack: Stack
) -> None:
    stack.forget()
    answer = _run_sdk_step(stack, node_clients, "beta_create")
    assert answer["type"] == "message"
    sent = [r for r in stack.received("/v1/messages") if r["status"] == 200]
    assert sent, stack.received()
    assert "context-management-2025-06-27" in sent[-1]["betas"]  # type: ignore[operator]
    body = sent[-1]["body"]
    assert isinstance(body, dict) and "context_management" in body
    _assert_upstream_saw_only_budgeter_key(stack.received())


def test_ts_sdk_models_list(node_clients: Path, stack: Stack) -> None:
    listed = _run_sdk_step(stack, node_clients, "models_list")
    ids = listed["ids"]
    assert isinstance(ids, list) and len(ids) >= 1 and all(isinstance(i, str) for i in ids)


def test_ts_sdk_batches_create_results_cancel_delete(node_clients: Path, stack: Stack) -> None:
    batches = _run_sdk_step(stack, node_clients, "batches")
    assert batches["created_status"] == "in_progress"
    assert batches["counts"] == {
        "processing": 0,
        "succeeded": 3,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert sorted(r["custom_id"] for r in batches["results"]) == ["ts-0", "ts-1", "ts-2"]  # type: ignore[attr-defined]
    assert {r["type"] for r in batches["results"]} == {"succeeded"}  # type: ignore[attr-defined]
    assert batches["cancel_status"] in ("canceling", "ended")
    counts = batches["canceled_counts"]
    assert isinstance(counts, dict) and counts["processing"] == 0
    assert counts["succeeded"] + counts["canceled"] + counts["errored"] == 3
    assert batches["deleted"] == ["message_batch_deleted", "message_batch_deleted"]


# --- Claude Code in print mode ---------------------------------------------------------------


def _claude_env(stack: Stack, home: Path, credential: str) -> dict[str, str]:
    """Only what Claude Code needs: budgeter as its API, a tenant key, a HOME of its own,
    and every switch that stops other traffic (telemetry, updates, error reports)."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "TMPDIR": str(home),
        "ANTHROPIC_BASE_URL": stack.api_url,
        credential: stack.keys["claude-code"],
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_BUG_COMMAND": "1",
        "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
        "CLAUDE_CODE_USE_BEDROCK": "0",
        "TERM": "dumb",
        "NO_COLOR": "1",
    }


@pytest.mark.parametrize("credential", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
@pytest.mark.timeout(400)
def test_claude_code_print_mode_through_budgeter(
    node_clients: Path, stack: Stack, tmp_path: Path, credential: str
) -> None:
    home = tmp_path / "home"
    project = tmp_path / "project"
    home.mkdir()
    project.mkdir()
    stack.forget()
    before = stack.used_tokens("claude-code")
    done = subprocess.run(
        [str(node_clients / "node_modules" / ".bin" / "claude"), "-p", "say hi"],
        env=_claude_env(stack, home, credential),
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    records = stack.received()
    shown = [(r["path"], r["status"], r["betas"]) for r in records]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}\n{shown}"
    assert done.stdout.strip(), done.stderr
    served = [r for r in records if r["path"] == "/v1/messages" and r["status"] == 200]
    assert served, shown
    betas = [beta for r in served for beta in r["betas"]]  # type: ignore[attr-defined]
    assert any(beta.startswith("claude-code-") for beta in betas), shown
    _assert_upstream_saw_only_budgeter_key(records)
    assert stack.used_tokens("claude-code") > before  # charged to the tenant's key


# --- langchain-anthropic ---------------------------------------------------------------------


def _chat(stack: Stack) -> object:
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(
        model=MODEL,
        base_url=stack.api_url,
        api_key=stack.keys["langchain"],
        max_tokens=64,
        max_retries=0,
    )


def test_langchain_invoke_stream_and_bind_tools(stack: Stack) -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_core.tools import tool

    chat = _chat(stack)
    assert isinstance(chat, ChatAnthropic)
    stack.forget()
    answer = chat.invoke("langchain: invoke")
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] >= 1

    chunks = list(chat.stream("langchain: stream"))
    assert "".join(str(c.content) for c in chunks if isinstance(c.content, str))

    @tool
    def lookup(city: str) -> str:
        """Find the weather of a city."""
        return f"sunny in {city}"

    with_tools = chat.bind_tools([lookup])
    answered = with_tools.invoke("langchain: what is the weather in Paris?")
    assert answered.content
    sent = [r for r in stack.received("/v1/messages") if r["status"] == 200]
    assert len(sent) == 3, [(r["path"], r["status"]) for r in stack.received()]
    last = sent[-1]["body"]
    assert isinstance(last, dict)
    assert [t["name"] for t in last["tools"]] == ["lookup"]
    assert sent[1]["body"]["stream"] is True  # type: ignore[index]
    _assert_upstream_saw_only_budgeter_key(stack.received())


def test_no_tenant_key_reaches_the_upstream(stack: Stack) -> None:
    """Whichever way a tenant sends its key, the upstream sees only budgeter's own."""
    stack.forget()
    key = stack.keys["langchain"]
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "k"}]}
    for auth in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
        answer = httpx.post(
            f"{stack.api_url}/v1/messages",
            json=body,
            headers={**auth, "anthropic-version": "2023-06-01"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    records = stack.received()
    assert len(records) >= 2
    _assert_upstream_saw_only_budgeter_key(records)
    assert (
        fingerprint(UPSTREAM_KEY)
        == "sha256:" + hashlib.sha256(UPSTREAM_KEY.encode()).hexdigest()[:12]
    )
    shown = json.dumps(records)
    assert all(k not in shown and fingerprint(k) not in shown for k in stack.keys.values())
