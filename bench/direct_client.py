"""The bench's direct client, in its own process on the worker's event loop (uvloop
where installed, as ``BUDGETER_EVENT_LOOP=auto`` picks for ``budgeter worker``): per job
count_tokens, then /messages, straight at the mock, with the same JSON codec (orjson) and
the same headers the worker's upstream client sends. Nothing else: it is the floor a
worker is measured against, so its CPU per job is the ideal client's.

It reads one JSON command a line on stdin and answers one JSON line on stdout:

- ``{"cmd": "round", "tag": T, "jobs": N, "concurrency": C}``: N jobs by C coroutines;
  answers ``{"elapsed": s, "done": n, "cpu_s": c}`` (c: this process's CPU in the round);
- ``{"cmd": "start", "lanes": C, "first": k, "stride": S, "wave": W, "max_tokens": M}``:
  C coroutines looping until ``stop`` (lane j's job ids k+j, k+j+S, ...), W connections opened per
  0.1 s (a burst of thousands of connects overflows a listen backlog into SYN retransmits);
  answers ``{"ok": true}`` once every lane has started;
- ``{"cmd": "mark"}``: answers ``{"done": n, "cpu_s": c, "t": monotonic}``;
- ``{"cmd": "stop"}``: ends the lanes; answers ``{"done": n}``.

    .venv/bin/python bench/direct_client.py http://127.0.0.1:8788
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp

from budgeter.cli.event_loop import loop_factory
from budgeter.domain import jsonio

HEADERS = {
    "x-api-key": "bench-upstream",
    "anthropic-version": "2023-06-01",
    "content-type": "application/json",
}


def params(tag: str, i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"direct job {tag}-{i}: say hello"}],
    }


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.count_url = f"{url}/v1/messages/count_tokens"
        self.messages_url = f"{url}/v1/messages"
        self.done = 0
        self.stop = asyncio.Event()
        self.lanes: list[asyncio.Task[None]] = []

    async def job(self, tag: str, i: int, max_tokens: int) -> None:
        body = params(tag, i, max_tokens)
        count = {"model": body["model"], "messages": body["messages"]}
        async with self.http.post(self.count_url, data=jsonio.dumps(count), headers=HEADERS) as r:
            answer = jsonio.loads(await r.read())
            assert r.status == 200 and "input_tokens" in answer, answer
        async with self.http.post(self.messages_url, data=jsonio.dumps(body), headers=HEADERS) as r:
            answer = jsonio.loads(await r.read())
            assert r.status == 200, answer
        self.done += 1

    async def round(self, tag: str, jobs: int, concurrency: int) -> dict[str, float]:
        todo = iter(range(jobs))
        done0, cpu0 = self.done, time.process_time()

        async def lane() -> None:
            for i in todo:
                await self.job(tag, i, 64)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return {
            "elapsed": time.perf_counter() - started,
            "done": self.done - done0,
            "cpu_s": time.process_time() - cpu0,
        }

    async def start(self, lanes: int, first: int, stride: int, wave: int, max_tokens: int) -> None:
        async def lane(i: int) -> None:
            while not self.stop.is_set():
                await self.job("lane", i, max_tokens)
                i += stride

        for k in range(lanes):
            self.lanes.append(asyncio.create_task(lane(first + k)))
            if k % wave == wave - 1:
                await asyncio.sleep(0.1)

    def mark(self) -> dict[str, float]:
        return {"done": self.done, "cpu_s": time.process_time(), "t": time.monotonic()}

    async def end(self) -> dict[str, float]:
        self.stop.set()
        await asyncio.gather(*self.lanes)
        return {"done": self.done}


async def main(url: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        client = Client(http, url)
        while line := await reader.readline():
            cmd = jsonio.loads(line)
            answer: dict[str, Any]
            if cmd["cmd"] == "round":
                answer = await client.round(cmd["tag"], cmd["jobs"], cmd["concurrency"])
            elif cmd["cmd"] == "start":
                await client.start(
                    cmd["lanes"], cmd["first"], cmd["stride"], cmd["wave"], cmd["max_tokens"]
                )
                answer = {"ok": True}
            elif cmd["cmd"] == "mark":
                answer = client.mark()
            else:
                answer = await client.end()
            sys.stdout.write(jsonio.dumps(answer).decode() + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    factory, _ = loop_factory("auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(sys.argv[1]))
