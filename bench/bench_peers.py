"""Row ``peers`` (``--peers``) — a real peer measured in the same run: LiteLLM's proxy
next to budgeter, both in front of the same mock (issue 20).

Starts, on loopback: an embedded redis-server, ``budgeter mock-upstream`` (fixed latency),
``budgeter api`` and LiteLLM's proxy (``litellm[proxy]`` in its own venv ``.venv-peers/``,
made by bench/peers/setup.sh when missing; config bench/peers/litellm.yaml: no database,
a random master key, ``claude-*`` routed to ``anthropic/claude-*`` at the mock, and a
``usage-based-routing-v2`` rpm/tpm limiter on the path). Both proxies log at WARNING or
above only. Then:

1. Open-loop at a fixed rate (default 50/s to each), interleaved request by request in a
   shuffled order per round: POST /v1/messages to the mock directly, to budgeter (a tenant
   key) and to LiteLLM's Anthropic-compatible /v1/messages (its master key). Rows: the p50
   and p99 each proxy adds over calling the mock directly, and their ratio.
2. The saturation search: budgeter and LiteLLM interleaved at 10, 25, 50, 100, 200, ... /s
   (a few seconds a step, bounded; 10 s timeout a request); a step is held when its p99 is
   under 1 s and every request answered 200. Row: the highest rate each held.

If LiteLLM cannot be installed or started here the rows say so (verdict info).

    .venv/bin/python bench/bench_peers.py [--quick] [--rate 50] [--seconds 20] [--latency-ms 20]
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import time
from dataclasses import dataclass, field

import aiohttp
from common import (
    ROOT,
    CpuMeter,
    Options,
    Proc,
    Row,
    base_env,
    budgeter_proc,
    pct,
    procs,
    redis_server,
    run_standalone,
    start_mock,
    wait_http,
)

from budgeter.store.embedded import free_port

PEERS = ROOT / "bench" / "peers"
VENV = ROOT / ".venv-peers"
LITELLM = VENV / "bin" / "litellm"
MODEL = "claude-sonnet-4-6"
SATURATION_P99_MS = 1000.0
REQUEST_TIMEOUT_S = 10.0
INSTALL_TIMEOUT_S = 1200.0
START_TIMEOUT_S = 180.0


class PeerUnavailable(Exception):
    """LiteLLM could not be installed or started: the row says so instead of a figure."""


@dataclass
class Sample:
    """Latencies (ms) of the requests that answered 200, and how many did not."""

    ms: list[float] = field(default_factory=list)
    failed: int = 0
    first_error: str = ""


@dataclass
class Step:
    rate: float
    sent_rate: float  # the rate the open-loop sender really reached (its own limit)
    samples: dict[str, Sample]

    def holds(self, name: str) -> bool:
        got = self.samples[name]
        return bool(got.ms) and got.failed == 0 and pct(got.ms, 0.99) < SATURATION_P99_MS


def ensure_litellm() -> str:
    """Runs bench/peers/setup.sh (creates .venv-peers/ and installs LiteLLM if missing);
    answers LiteLLM's version. Raises PeerUnavailable with a one-line reason."""
    if not LITELLM.exists():
        print("  peers: .venv-peers/ missing, installing litellm[proxy] (a few minutes)")
    try:
        out = subprocess.run(
            ["bash", str(PEERS / "setup.sh")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"bench/peers/setup.sh did not finish: {exc}") from exc
    for line in out.stdout.splitlines():
        print(f"  {line}")
    if out.returncode != 0 or not LITELLM.exists():
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"installing litellm[proxy] failed ({tail[:200]})")
    version = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return version.stdout.strip() or "?"


async def start_litellm(mock_url: str, master_key: str) -> tuple[Proc, str]:
    port = free_port()
    env = {
        **os.environ,
        "PEER_MOCK_URL": mock_url,
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the remote price list
        "LITELLM_LOG": "ERROR",
    }
    for name in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST"):  # no database, no shared cache
        env.pop(name, None)
    proc = Proc(
        "litellm",
        [
            str(LITELLM),
            "--config",
            str(PEERS / "litellm.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log_config",
            str(PEERS / "uvicorn-log.json"),
        ],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.popen.poll() is not None:
            tail = " ".join(proc.log_text().strip().splitlines()[-3:])[-300:]
            proc.stop()
            raise PeerUnavailable(f"litellm exited at start (code {proc.popen.returncode}): {tail}")
        try:
            await wait_http(f"{url}/health/liveliness", timeout_s=2.0)
            return proc, url
        except TimeoutError:
            if time.monotonic() > deadline:
                proc.stop()
                raise PeerUnavailable(f"litellm not healthy after {START_TIMEOUT_S:g} s") from None


class Driver:
    """Sends POST /v1/messages to each target, open-loop, recording latencies."""

    def __init__(self, http: aiohttp.ClientSession, targets: dict[str, tuple[str, str]]) -> None:
        self.http = http
        self.targets = targets  # name -> (base url, x-api-key)
        self.samples: dict[str, Sample] = {name: Sample() for name in targets}

    async def one(self, name: str, i: int) -> None:
        base, key = self.targets[name]
        body = {
            "model": MODEL,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"benchmark request {i % 50}"}],
        }
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        got = self.samples[name]
        t0 = time.perf_counter()
        try:
            async with (
                asyncio.timeout(REQUEST_TIMEOUT_S),
                self.http.post(f"{base}/v1/messages", json=body, headers=headers) as r,
            ):
                text = await r.read()
                if r.status != 200:
                    got.failed += 1
                    got.first_error = got.first_error or f"{r.status} {text[:120]!r}"
                    return
        except (TimeoutError, aiohttp.ClientError) as exc:
            got.failed += 1
            got.first_error = got.first_error or f"{type(exc).__name__} {exc}"[:160]
            return
        got.ms.append((time.perf_counter() - t0) * 1000)

    async def run(self, names: tuple[str, ...], rate: float, seconds: float, seed: int) -> Step:
        """``rate`` requests/s to each of ``names`` for ``seconds``, shuffled per round."""
        self.samples = {name: Sample() for name in self.targets}
        order = random.Random(seed)
        rounds = max(1, int(rate * seconds))
        schedule = [n for _ in range(rounds) for n in order.sample(names, len(names))]
        tasks = []
        start = time.perf_counter()
        for i, name in enumerate(schedule):
            delay = start + i / (len(names) * rate) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(name, i)))
        sent = time.perf_counter() - start
        await asyncio.gather(*tasks)
        sent_rate = rounds / sent if sent > 0 else rate
        return Step(rate, min(rate, sent_rate), dict(self.samples))


@dataclass
class Measured:
    version: str
    side_by_side: Step
    steps: list[Step]
    cpu_ms: dict[str, float]  # CPU ms per request of each proxy process, side by side


async def measure(
    rate: float, seconds: float, latency_ms: float, rates: list[float], step_s: float
) -> Measured:
    version = await asyncio.to_thread(ensure_litellm)
    async with redis_server("peers") as (server, _redis):
        with procs() as started:
            mock, mock_url = await start_mock(latency_ms, base_env(server.url))
            started.append(mock)
            api_port = free_port()
            api_url = f"http://127.0.0.1:{api_port}"
            started.append(
                budgeter_proc(
                    "api", ["api", "--port", str(api_port)], base_env(server.url, mock_url)
                )
            )
            master_key = "sk-" + secrets.token_hex(32)
            litellm, litellm_url = await start_litellm(mock_url, master_key)
            started.append(litellm)
            await wait_http(f"{api_url}/healthz")
            # idle connections dropped before uvicorn (LiteLLM) closes them at 5 s
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)
            async with aiohttp.ClientSession(connector=connector) as http:
                admin = {"authorization": "Bearer bench"}
                policy = {"budgets": {"day": 10**13}, "rate": {"rpm": 10**8}}
                async with http.put(
                    f"{api_url}/admin/tenants/bench", json=policy, headers=admin
                ) as r:
                    assert r.status in (200, 201), await r.text()
                async with http.post(f"{api_url}/admin/tenants/bench/keys", headers=admin) as r:
                    key = (await r.json())["key"]
                driver = Driver(
                    http,
                    {
                        "direct": (mock_url, "bench-upstream"),
                        "budgeter": (api_url, key),
                        "litellm": (litellm_url, master_key),
                    },
                )
                every = ("direct", "budgeter", "litellm")
                # warm-up: connections, budgeter's count_tokens cache, LiteLLM's first calls
                for _ in range(2):
                    await asyncio.gather(*(driver.one(n, i) for i in range(50) for n in every))
                warm = driver.samples["litellm"]
                if warm.failed:
                    raise PeerUnavailable(f"litellm refused the warm-up: {warm.first_error}")
                # then a few seconds at the measured rate, discarded: LiteLLM is slow for
                # a while after its first requests
                await driver.run(every, rate, min(seconds, 4.0), seed=19)
                meter = CpuMeter({"budgeter": started[1], "litellm": litellm}, include_self=False)
                with meter:
                    side = await driver.run(every, rate, seconds, seed=20)
                cpu_ms = {
                    name: 1000 * used / max(1, len(side.samples[name].ms))
                    for name, used in meter.used.items()
                }
                steps: list[Step] = []
                for step_rate in rates:
                    print(f"  peers: saturation step {step_rate:g}/s to each")
                    step = await driver.run(("budgeter", "litellm"), step_rate, step_s, seed=21)
                    steps.append(step)
                    if not step.holds("litellm") and not step.holds("budgeter"):
                        break
                    if step.sent_rate < 0.8 * step_rate:  # the sender itself is the limit
                        break
    return Measured(version, side, steps, cpu_ms)


def unavailable_rows(reason: str) -> list[Row]:
    return [
        Row(
            "peers",
            "LiteLLM proxy next to budgeter (not measured)",
            0.0,
            "",
            None,
            reason,
            None,
            "—",
            None,
            note=f"LiteLLM unavailable here: {reason}",
        )
    ]


def held(steps: list[Step], name: str) -> float:
    """The highest rate of the ascending steps ``name`` held (0 if none)."""
    best = 0.0
    for step in steps:
        if not step.holds(name):
            break
        best = step.rate
    return best


def describe(step: Step, name: str) -> str:
    got = step.samples[name]
    if not got.ms:
        return f"{name} no answer ({got.failed} failed: {got.first_error})"
    text = f"{name} p50 {pct(got.ms, 0.5):.1f} / p99 {pct(got.ms, 0.99):.1f} ms"
    if got.failed:
        text += f", {got.failed} failed ({got.first_error})"
    return text


def rows_for(got: Measured, rate: float, seconds: float, latency_ms: float) -> list[Row]:
    side = got.side_by_side.samples
    d, b, lt = side["direct"].ms, side["budgeter"].ms, side["litellm"].ms
    if not d or not b or not lt:
        failed = ", ".join(describe(got.side_by_side, n) for n in side)
        return unavailable_rows(f"a target did not answer at {rate:g}/s: {failed}")
    setup = (
        f"LiteLLM {got.version} proxy (its Anthropic-compatible POST /v1/messages, master key, "
        f"no database, usage-based-routing-v2 rpm/tpm limiter on the path, 1 uvicorn worker) "
        f"and budgeter api (tenant key), {rate:g}/s to each of direct, budgeter and LiteLLM, "
        f"interleaved in a shuffled order, {seconds:g} s, mock latency {latency_ms:g} ms, "
        f"{len(d)} + {len(b)} + {len(lt)} requests"
    )
    absolute = "; ".join(describe(got.side_by_side, n) for n in ("direct", "budgeter", "litellm"))
    cpu = got.cpu_ms
    absolute += (
        f". CPU ms per request: budgeter api {cpu.get('budgeter', 0):.2f}, LiteLLM proxy "
        f"{cpu.get('litellm', 0):.2f}"
    )
    steps = "; ".join(
        f"{s.rate:g}/s (sent {s.sent_rate:.0f}/s): {describe(s, 'budgeter')}, "
        f"{describe(s, 'litellm')}"
        for s in got.steps
    )
    rows = []
    for q in (0.5, 0.99):
        added_b = pct(b, q) - pct(d, q)
        added_l = pct(lt, q) - pct(d, q)
        rows.append(
            Row(
                "peers",
                f"p{int(q * 100)} latency added by POST /v1/messages: budgeter vs LiteLLM proxy",
                added_b,
                "ms",
                added_l,
                "LiteLLM proxy's added latency, same requests interleaved",
                added_b / added_l if added_l > 0 else None,
                "(comparison)",
                None,
                note=f"{setup}. {absolute}" if q == 0.5 else "",
            )
        )
    top_b, top_l = held(got.steps, "budgeter"), held(got.steps, "litellm")
    last = got.steps[-1] if got.steps else None
    bound = (
        " (the search stopped where the bench's own sender fell behind)"
        if last is not None and last.sent_rate < 0.8 * last.rate
        else ""
    )
    rows.append(
        Row(
            "peers",
            "saturation: highest rate held with p99 < 1 s, budgeter vs LiteLLM proxy",
            top_b,
            "/s",
            top_l,
            "LiteLLM proxy's highest rate held, same steps",
            top_b / top_l if top_l > 0 else None,
            "(comparison)",
            None,
            note=(
                f"Steps of a few seconds each, budgeter and LiteLLM interleaved at each rate, "
                f"a step held when p99 < 1 s and no request failed (10 s timeout){bound}: "
                f"{steps}"
            ),
        )
    )
    return rows


async def run(opts: Options) -> list[Row]:
    rate = float(opts.extra.get("rate", 50.0))
    seconds = float(opts.extra.get("seconds", 8.0 if opts.quick else 20.0))
    latency_ms = float(opts.extra.get("latency_ms", 20.0))
    step_s = float(opts.extra.get("step_seconds", 3.0 if opts.quick else 6.0))
    top = 800.0 if opts.quick else 1600.0
    rates = [10.0, 25.0, 50.0]
    while rates[-1] < top:
        rates.append(rates[-1] * 2)
    try:
        got = await measure(rate, seconds, latency_ms, rates, step_s)
    except PeerUnavailable as exc:
        return unavailable_rows(str(exc))
    return rows_for(got, rate, seconds, latency_ms)


if __name__ == "__main__":
    run_standalone(run, rate=float, seconds=float, latency_ms=float, step_seconds=float)
