"""Creating one 100,000-request batch through the API: time and Redis memory.

Runs everything on loopback: an embedded redis-server, `budgeter api` in-process, and an
aiohttp client that POSTs /v1/messages/batches. Side by side in the same run, the floor:
writing the same 100,000 job JSONs into Redis with a plain pipeline (HSET + RPUSH), no
validation, no atomicity. Prints both and their ratio.

    .venv/bin/python bench/bench_batch_create.py [--requests 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import aiohttp

from budgeter.api.app import create_app
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis

PROMPT = (
    "Summarise the following support ticket in two sentences and classify its urgency "
    "as low, medium or high. Ticket #{i}: the nightly export job failed with a timeout."
)


def batch(n: int) -> dict[str, object]:
    return {
        "requests": [
            {
                "custom_id": f"ticket-{i:06d}",
                "params": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 256,
                    "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
                },
            }
            for i in range(n)
        ]
    }


async def used_memory(redis: object) -> int:
    info = await redis.info("memory")  # type: ignore[attr-defined]
    return int(info["used_memory"])


async def main(n: int) -> None:
    body = json.dumps(batch(n)).encode()
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedRedis(data, appendonly=False)
        server.start()
        redis = make_redis(server.url)
        try:
            settings = Settings(redis_url=server.url, admin_token="bench")  # type: ignore[arg-type]
            async with serve_app(create_app(settings, redis=redis), "127.0.0.1", 0) as port:
                base = f"http://127.0.0.1:{port}"
                admin = {"authorization": "Bearer bench"}
                async with aiohttp.ClientSession() as http:
                    await http.put(f"{base}/admin/tenants/bench", json={}, headers=admin)
                    async with http.post(f"{base}/admin/tenants/bench/keys", headers=admin) as r:
                        key = (await r.json())["key"]
                    before = await used_memory(redis)
                    started = time.perf_counter()
                    async with http.post(
                        f"{base}/v1/messages/batches",
                        data=body,
                        headers={"x-api-key": key, "content-type": "application/json"},
                    ) as resp:
                        answer = await resp.json()
                    api_s = time.perf_counter() - started
                    assert answer["request_counts"]["processing"] == n, answer
                    api_bytes = await used_memory(redis) - before

            await redis.flushall()
            before = await used_memory(redis)
            jobs = [(f"b:{r['custom_id']}", json.dumps(r["params"])) for r in batch(n)["requests"]]
            started = time.perf_counter()
            for start in range(0, n, 5000):
                async with redis.pipeline(transaction=False) as pipe:
                    for job_id, params in jobs[start : start + 5000]:
                        pipe.hset("raw:jobs", job_id, params)
                        pipe.rpush("raw:queue", job_id)
                    await pipe.execute()
            raw_s = time.perf_counter() - started
            raw_bytes = await used_memory(redis) - before
        finally:
            await redis.aclose()
            server.stop()

    print(f"requests in batch            {n:>12,}")
    print(f"request body                 {len(body) / 1e6:>12.1f} MB")
    print(f"API create (validate+queue)  {api_s:>12.2f} s   {n / api_s:>10,.0f} requests/s")
    print(f"raw pipeline HSET+RPUSH      {raw_s:>12.2f} s   {n / raw_s:>10,.0f} requests/s")
    print(f"time ratio API / raw         {api_s / raw_s:>12.2f}")
    print(f"Redis memory, API batch      {api_bytes / 1e6:>12.1f} MB   {api_bytes / n:>8.0f} B/req")
    print(f"Redis memory, raw floor      {raw_bytes / 1e6:>12.1f} MB   {raw_bytes / n:>8.0f} B/req")
    print(f"memory ratio API / raw       {api_bytes / raw_bytes:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().requests))
