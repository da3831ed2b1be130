"""The console script as users run it: mock-upstream, worker, submit --wait, results,
usage, demo. Real processes on loopback, bounded in time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import start_budgeter, wait_http


async def run(*args: str, env: dict[str, str], limit_s: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budgeter",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_DATA_DIR": str(tmp_path / "data"),
        "BUDGETER_LOG_LEVEL": "WARNING",
    }


@pytest.mark.usefixtures("redis")  # a flushed Redis
async def test_submit_wait_results_usage_with_real_processes(
    env: dict[str, str], tmp_path: Path
) -> None:
    mock, mock_port = await start_budgeter("mock-upstream", port_dir=tmp_path, env=env)
    env = {**env, "BUDGETER_UPSTREAM_URL": f"http://127.0.0.1:{mock_port}"}
    try:
        worker, metrics_port = await start_budgeter(
            "worker", "--concurrency", "4", port_dir=tmp_path, env=env
        )
    except BaseException:
        mock.kill()
        await mock.wait()
        raise
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/healthz")
        await wait_http(f"http://127.0.0.1:{metrics_port}/healthz")
        policy = '{"budgets": {"day": 100000}, "rate": {"rpm": 600}}'
        assert (await run("tenants", "set", "cli-t", "--policy", policy, env=env))[0] == 0
        path = tmp_path / "batch.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "custom_id": f"c{i}",
                        "params": {
                            "model": "claude-test",
                            "max_tokens": 32,
                            "messages": [{"role": "user", "content": f"hello {i}"}],
                            "temperature": 0.5,
                        },
                    }
                )
                + "\n"
                for i in range(12)
            )
        )
        code, out, _ = await run("submit", "--tenant", "cli-t", str(path), "--wait", env=env)
        assert code == 0
        batch_id = out.strip()
        assert batch_id.startswith("msgbatch_")
        code, out, _ = await run("results", batch_id, env=env)
        assert code == 0
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(12)]
        assert {line["result"]["type"] for line in lines} == {"succeeded"}
        code, out, _ = await run("usage", "--tenant", "cli-t", "--json", env=env)
        report = json.loads(out)
        day = report["budgets"][0]
        assert day["period"] == "day" and day["reserved"] == 0
        settled = sum(
            line["result"]["message"]["usage"]["input_tokens"]
            + line["result"]["message"]["usage"]["output_tokens"]
            for line in lines
        )
        assert day["used"] == settled and day["remaining"] == 100000 - settled
        assert report["usage"][0]["requests"] == 12
        code, out, _ = await run("usage", "--tenant", "cli-t", env=env)
        assert code == 0 and "budgets of cli-t" in out
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
            text = await resp.text()
        assert 'budgeter_jobs_total{outcome="succeeded",tenant="cli-t"} 12.0' in text
        assert "budgeter_upstream_request_duration_seconds_bucket" in text
    finally:
        for proc in (worker, mock):
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 60) == 0
        assert await asyncio.wait_for(mock.wait(), 60) == 0


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(int(entry.name))
    return found


async def test_demo_runs_to_the_end_and_leaves_no_process(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUDGETER_")}
    marker = str(tmp_path / "demo-data")
    env["BUDGETER_DATA_DIR"] = marker
    code, out, err = await run("demo", "--requests", "60", "--no-progress", env=env, limit_s=240)
    assert code == 0, err
    assert "alpha" in out and "beta" in out and "gamma" in out
    assert "jobs/s" in err
    await asyncio.sleep(0.2)
    assert _processes_mentioning(marker) == []
