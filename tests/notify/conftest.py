"""The notification tests' webhook receiver: a process of its own on loopback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import read_port

RECEIVER = Path(__file__).with_name("receiver.py")


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A receiver process that answers 500 to its first 2 requests: (its URL, its log)."""
    port_file, log = tmp_path / "port", tmp_path / "received.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(RECEIVER),
        "--port-file",
        str(port_file),
        "--log",
        str(log),
        "--fail-first",
        "2",
    )
    try:
        port = await read_port(port_file, proc)
        yield f"http://127.0.0.1:{port}/hook", log
    finally:
        proc.terminate()
        await proc.wait()
