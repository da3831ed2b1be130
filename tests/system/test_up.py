"""``budgeter up --mock``: one command runs the whole local stack; the official anthropic
SDK works against it (a message and a batch); SIGTERM stops every child and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from budgeter.store.shared_redis import SharedRedis, pid_alive
from tests.helpers import read_port_blocking

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    yield path
    SharedRedis(path).stop()  # `up` leaves the shared Redis running, by design


def _field(banner: str, pattern: str) -> str:
    found = re.search(pattern, banner, re.MULTILINE)
    assert found, f"{pattern!r} not in:\n{banner}"
    return found.group(1)


def test_up_runs_the_stack_the_sdk_works_and_sigterm_stops_it_all(
    tmp_path: Path, data_dir: Path
) -> None:
    up_stack_and_sdk_example([sys.executable, "-m", "budgeter"], tmp_path, data_dir)


def up_stack_and_sdk_example(budgeter: list[str], tmp_path: Path, data_dir: Path) -> None:
    """``BUDGETER up --mock``, the SDK's message and batch against it, SIGTERM; also run
    from a clean venv holding only the wheel (tests/system/test_package.py)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BUDGETER_REDIS_URL", "BUDGETER_ADMIN_TOKEN", "BUDGETER_UPSTREAM_URL")
    }
    env |= {"BUDGETER_DATA_DIR": str(data_dir), "BUDGETER_LOG_LEVEL": "WARNING"}
    port_file = tmp_path / "up.port"
    with open(tmp_path / "up.out", "wb") as out, open(tmp_path / "up.err", "wb") as err:
        up = subprocess.Popen(
            [
                *(*budgeter, "up", "--mock", "--port", "0"),
                *("--port-file", str(port_file), "--workers", "2", "--tenant", "demo"),
            ],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=err,
        )
        try:
            port = read_port_blocking(port_file, up, timeout_s=300)
            banner = (tmp_path / "up.out").read_text()
            base_url = _field(banner, r"^  export ANTHROPIC_BASE_URL=(\S+)$")
            key = _field(banner, r"^  export ANTHROPIC_API_KEY=(\S+)")
            token = _field(banner, r"^  admin token  (\S+)$")
            pids = dict(item.split("=") for item in _field(banner, r"^  pids +(.+)$").split())
            assert base_url == f"http://127.0.0.1:{port}"
            assert sorted(pids) == ["api", "mock-upstream", "worker-1", "worker-2"]

            admin = httpx.get(
                f"{base_url}/admin/tenants/demo",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert admin.status_code == 200, admin.text  # the token it generated works

            client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=2)
            message = client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=64,
                messages=[{"role": "user", "content": "Hello"}],
            )
            assert message.content and message.usage.output_tokens > 0
            batch = client.messages.batches.create(
                requests=[
                    {
                        "custom_id": f"q-{i}",
                        "params": {
                            "model": "claude-sonnet-4-5",
                            "max_tokens": 64,
                            "messages": [{"role": "user", "content": f"question {i}"}],
                        },
                    }
                    for i in range(10)
                ]
            )
            deadline = time.monotonic() + 180  # a guard against a hang, not a speed check
            while client.messages.batches.retrieve(batch.id).processing_status != "ended":
                assert time.monotonic() < deadline, "the batch did not end"
                time.sleep(0.2)
            results = list(client.messages.batches.results(batch.id))
            assert sorted(r.custom_id for r in results) == sorted(f"q-{i}" for i in range(10))
            assert {r.result.type for r in results} == {"succeeded"}
            client.close()

            up.send_signal(signal.SIGTERM)
            assert up.wait(timeout=120) == 0
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    for name, pid in pids.items():
        assert not pid_alive(int(pid)), f"{name} (pid {pid}) outlived budgeter up"
    errors = (tmp_path / "up.err").read_text()
    assert "Traceback" not in errors, errors
    assert SharedRedis(data_dir).running() is not None  # the shared Redis belongs to no one
    assert not (tmp_path / ".budgeter").exists()
