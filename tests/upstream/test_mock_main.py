"""``budgeter mock-upstream --reuse-port``: several mock processes listen on one port
(SO_REUSEPORT), as the benchmarks run them; without the flag a taken port is refused."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from budgeter.serving import ListenError, serve_app
from budgeter.upstream.mock import create_app
from tests.helpers import read_port, start_budgeter


async def test_serve_app_shares_a_port_only_with_reuse_port() -> None:
    async with serve_app(create_app(), "127.0.0.1", 0, reuse_port=True) as port:
        async with serve_app(create_app(), "127.0.0.1", port, reuse_port=True) as again:
            assert again == port
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/healthz") as resp,
            ):
                assert resp.status == 200
        with pytest.raises(ListenError) as refused:
            async with serve_app(web.Application(), "127.0.0.1", port):
                pass
        assert refused.value.in_use


async def test_two_mock_processes_serve_one_port(tmp_path: Path) -> None:
    first, port = await start_budgeter("mock-upstream", "--reuse-port", port_dir=tmp_path)
    port_file = tmp_path / "second.port"
    second = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budgeter",
        "mock-upstream",
        "--reuse-port",
        "--port",
        str(port),
        "--port-file",
        str(port_file),
    )
    try:
        assert await read_port(port_file, second) == port
        first.terminate()
        assert await first.wait() == 0
        # the second still listens: new connections go to it alone
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status == 200
    finally:
        for proc in (first, second):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
