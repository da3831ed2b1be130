"""The tests' TCP relay (tests/tcp_relay.py) leaves no transport behind, however a
connection's arrival and the relay's stop fall (issue 21: an unclosed transport seen in
two full runs of the relay's tests, fd 29 both times)."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings

import pytest

from tests.tcp_relay import TcpRelay


async def _connect_then_stop(relay_turns: int, target_port: int) -> int:
    """Connect to a relay, let the loop turn ``relay_turns`` times (the connection is then
    somewhere between the kernel's backlog and its relay task), stop the relay."""
    relay = await TcpRelay("127.0.0.1", target_port).start()
    client = socket.create_connection(("127.0.0.1", relay.port))
    try:
        for _ in range(relay_turns):
            await asyncio.sleep(0)
        await relay.stop()
    finally:
        client.close()
    return relay.connections


@pytest.mark.parametrize("turns", range(8))
def test_a_connection_arriving_as_the_relay_stops_leaves_no_transport(turns: int) -> None:
    """Each number of loop turns catches the connection at another stage (not yet
    accepted, accepted by asyncio, handed to the relay, its task started or not); the
    loop is then closed at once, as a test's ends, and nothing may warn."""
    target = socket.create_server(("127.0.0.1", 0))  # the "server": listens, never answers
    try:
        port = target.getsockname()[1]
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            with asyncio.Runner() as runner:
                runner.run(_connect_then_stop(turns, port))
            gc.collect()  # an unclosed transport warns (an error here) as it is collected
    finally:
        target.close()
