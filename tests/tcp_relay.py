"""A TCP relay on loopback between a process and a server (Redis), that a test pauses.

    async with TcpRelay("127.0.0.1", redis_port) as relay:
        client = make_redis(f"redis://127.0.0.1:{relay.port}/0")
        await relay.pause()            # a partition: bytes are held, connections hang
        await relay.pause(drop=True)   # the server gone: connections closed, new ones too
        await relay.resume()           # forwarding again (held bytes go on their way)

``pause()`` keeps every connection open and forwards nothing in either direction (new
connections are accepted and held the same way): what a network partition looks like to
both ends. ``pause(drop=True)`` closes every connection and closes each new one at once:
what a dead server looks like. ``resume()`` forwards again; ``stop()`` (or leaving the
``async with``) closes everything. ``connections`` counts the connections accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class TcpRelay:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._dropping = False
        self._stopped = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # the pipes
        self._accepts: set[asyncio.Task[None]] = set()  # one per connection, until it closes
        self._clients: set[asyncio.StreamWriter] = set()  # accepted, not yet closed

    @property
    def url(self) -> str:
        """A redis:// URL through the relay."""
        return f"redis://{self.host}:{self.port}/0"

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._on_connect, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def pause(self, *, drop: bool = False) -> None:
        """Stop forwarding; with ``drop``, also close every connection (and new ones)."""
        if drop:  # the pipes of closed connections end; nothing waits on them
            self._dropping = True
            await self._close_all()
        else:
            self._flowing.clear()

    async def resume(self) -> None:
        self._dropping = False
        self._flowing.set()

    async def stop(self) -> None:
        """Close everything and wait until every connection's two ends are closed: a
        connection still being set up when the relay stops is closed too, so no transport
        is left for the garbage collector to warn about in a later test."""
        self._stopped = True
        if self._server is not None:
            # asyncio sets up an accepted connection in a task of its own (a loop turn or
            # two before _on_connect); a server closed meanwhile fails it half-made
            # (Python 3.11: Server._attach asserts) and leaves its transport unclosed, for
            # the collector to warn about. So the server closes only once no connection
            # is being set up: the check and close() run without a loop turn between them
            for _ in range(100):
                accepting = [task for task in asyncio.all_tasks() if _accepting(task)]
                if not accepting:
                    break
                await asyncio.wait(accepting, timeout=5)
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._close_all()
        pending = self._tasks | self._accepts
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        # a connection whose task was cancelled before it ever ran (its finally never ran)
        for writer in list(self._clients):
            await _close(writer)
        self._clients.clear()

    async def __aenter__(self) -> TcpRelay:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The server's callback for each connection, run before any of it: from here the
        connection is the relay's, and stop() closes it even if its task never runs (a
        task cancelled before its first step skips its own ``finally``)."""
        self.connections += 1
        self._clients.add(writer)
        task = asyncio.ensure_future(self._accept(reader, writer))
        self._accepts.add(task)
        task.add_done_callback(self._accepts.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ends = [writer]
        try:
            if self._dropping or self._stopped:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                return
            ends.append(up_writer)
            if self._dropping or self._stopped:  # dropped or stopped while connecting
                return
            self._writers.update(ends)
            pipes = [
                asyncio.ensure_future(self._pipe(reader, up_writer)),
                asyncio.ensure_future(self._pipe(up_reader, writer)),
            ]
            for pipe in pipes:
                self._tasks.add(pipe)
                pipe.add_done_callback(self._tasks.discard)
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
        finally:  # both ends closed however the connection ends, cancelled included
            self._clients.discard(writer)
            for end in ends:
                self._writers.discard(end)
                end.close()
            with contextlib.suppress(OSError, ConnectionError):
                for end in ends:
                    await end.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                await self._flowing.wait()
                if self._dropping:
                    return
                writer.write(data)
                await writer.drain()

    async def _close_all(self) -> None:
        writers, self._writers = list(self._writers), set()
        for writer in writers:
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ConnectionError):
        await writer.wait_closed()


def _accepting(task: asyncio.Task[object]) -> bool:
    """``task`` is asyncio's own, handing an accepted connection to a server's callback."""
    return getattr(task.get_coro(), "__qualname__", "").endswith("_accept_connection2")
