"""``budgeter up``: a whole local stack in one command, for a laptop.

The shared embedded Redis (unless ``BUDGETER_REDIS_URL`` names one), ``budgeter api``,
N ``budgeter worker`` processes and, with ``--mock``, ``budgeter mock-upstream`` (the
children get its URL as ``BUDGETER_UPSTREAM_URL``). Each child is ``sys.executable -m
budgeter ...`` started with ``--port-file``, so its port is known once it listens. It
prints the API's URL, the admin token (generated unless ``BUDGETER_ADMIN_TOKEN`` is set)
and how to point the ``anthropic`` SDK at it; ``--tenant NAME`` also creates that tenant
(when absent) and a key for it. SIGTERM or Ctrl-C stops every child (SIGTERM: the
workers drain), the mock upstream last; the embedded Redis keeps running
(``budgeter redis stop``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from budgeter.cli.errors import CliError
from budgeter.cli.parser import _port, _positive_int

if TYPE_CHECKING:
    from budgeter.settings import Settings

ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)
log = logging.getLogger("budgeter.up")

STARTER_POLICY = {"budgets": {"day": 2_000_000}, "rate": {"rpm": 600}}
START_TIMEOUT_S = 60.0
MOCK = "mock-upstream"


def register(sub: argparse._SubParsersAction[ParserT]) -> None:
    up = sub.add_parser(
        "up",
        help="run a whole local stack: embedded Redis, api, workers (and a mock upstream)",
        description="Run the shared embedded Redis, `budgeter api` and N workers (with --mock "
        "the mock upstream too) until SIGTERM or Ctrl-C, which stops them all.",
    )
    up.add_argument(
        "--mock",
        action="store_true",
        help="also run the built-in mock upstream and send the workers' calls there "
        "(default: BUDGETER_UPSTREAM_URL)",
    )
    up.add_argument(
        "--workers", type=_positive_int, default=2, help="worker processes (default: %(default)s)"
    )
    up.add_argument(
        "--concurrency",
        type=_positive_int,
        default=16,
        help="jobs each worker serves at once (default: %(default)s)",
    )
    up.add_argument(
        "--host", default="127.0.0.1", help="address the API listens on (default: %(default)s)"
    )
    up.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="port of the API (0: any free port; default: %(default)s)",
    )
    up.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write the API's port there once the whole stack is up (default: none)",
    )
    up.add_argument(
        "--tenant",
        metavar="NAME",
        default=None,
        help="create tenant NAME when absent (day budget 2M tokens, 600 rpm), make it a "
        "new key and print it (default: none)",
    )
    up.set_defaults(run=run_up)


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    port: int = 0


@dataclass
class Stack:
    """The processes ``up`` started, in start order."""

    env: dict[str, str]
    port_dir: Path
    children: list[Child] = field(default_factory=list)

    async def start(self, name: str, argv: list[str], stop: asyncio.Event) -> int | None:
        """Start ``budgeter ARGV --port-file ...``; its port once it listens, None when
        ``stop`` was set meanwhile. A child that exits first is a CliError."""
        from budgeter.store.embedded import die_with_parent

        port_file = self.port_dir / f"{name}.port"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            *argv,
            "--port-file",
            str(port_file),
            env=self.env,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # `up` killed hard: its children go too
            # a group of its own: a terminal's Ctrl-C reaches `up` alone, which drains them
            start_new_session=True,
        )
        child = Child(name, proc)
        self.children.append(child)
        async with asyncio.timeout(START_TIMEOUT_S):
            while not stop.is_set():
                text = port_file.read_text() if port_file.exists() else ""
                if text.endswith("\n"):  # written whole (renamed into place)
                    child.port = int(text)
                    return child.port
                if proc.returncode is not None:
                    raise CliError(
                        f"{name} exited (status {proc.returncode}) before listening; "
                        "its log is above"
                    )
                await asyncio.sleep(0.05)
        return None

    async def wait(self, stop: asyncio.Event) -> int:
        """Until ``stop`` is set (0) or a child exits on its own (1)."""
        exits = {asyncio.create_task(c.proc.wait()): c for c in self.children}
        stopper = asyncio.create_task(stop.wait())
        done, pending = await asyncio.wait({stopper, *exits}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if stopper in done:
            return 0
        gone = [exits[task] for task in done if task in exits]
        for child in gone:
            log.error(
                "%s exited (status %s); stopping the others", child.name, child.proc.returncode
            )
        return 1

    async def stop_all(self, drain_s: float) -> None:
        """SIGTERM the api and workers (they drain; workers may still call the upstream),
        then the mock upstream; whatever outlives the drain is killed."""
        first = [c for c in self.children if c.name != MOCK]
        last = [c for c in self.children if c.name == MOCK]
        for group in (first, last):
            await _terminate(group, drain_s + 15)


async def _terminate(children: list[Child], timeout_s: float) -> None:
    running = [c for c in children if c.proc.returncode is None]
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            child.proc.terminate()
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(c.proc.wait() for c in running))
    except TimeoutError:
        for child in running:
            if child.proc.returncode is None:
                log.warning("%s did not stop within %g s; killing it", child.name, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
        await asyncio.gather(*(c.proc.wait() for c in running))


async def run_up(args: argparse.Namespace, settings: Settings) -> int:
    from budgeter.domain.policy import check_tenant_id
    from budgeter.serving import stop_event_on_signals, write_port_file
    from budgeter.store.client import redacted_url, resolve_redis_url

    if args.tenant is not None:
        check_tenant_id(args.tenant)
    stop = stop_event_on_signals()
    env = {**os.environ, "BUDGETER_DATA_DIR": str(settings.data_dir)}
    redis_url = await resolve_redis_url(settings, announce=True)  # started here when absent
    generated = settings.admin_token is None
    token = secrets.token_urlsafe(24) if generated else _secret(settings)
    env["BUDGETER_ADMIN_TOKEN"] = token
    stack = Stack(env, Path(tempfile.mkdtemp(prefix="budgeter-up-")))
    try:
        ports = await _start_stack(stack, args, stop)
        if ports is None:  # stopped while starting
            return 0
        api_url = _base_url(args.host, ports["api"])
        key = await _tenant_key(api_url, token, args.tenant) if args.tenant else None
        _print_banner(stack, args, api_url, redacted_url(redis_url), token, generated, key)
        if args.port_file is not None:
            write_port_file(args.port_file, ports["api"])
        return await stack.wait(stop)
    finally:
        await stack.stop_all(settings.drain_seconds)
        shutil.rmtree(stack.port_dir, ignore_errors=True)


def _secret(settings: Settings) -> str:
    assert settings.admin_token is not None
    return settings.admin_token.get_secret_value()


async def _start_stack(
    stack: Stack, args: argparse.Namespace, stop: asyncio.Event
) -> dict[str, int] | None:
    ports: dict[str, int] = {}
    if args.mock:
        port = await stack.start(MOCK, [MOCK, "--host", "127.0.0.1", "--port", "0"], stop)
        if port is None:
            return None
        stack.env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{port}"
    api = await stack.start("api", ["api", "--host", args.host, "--port", str(args.port)], stop)
    if api is None:
        return None
    ports["api"] = api
    worker = ["worker", "--metrics-port", "0", "--concurrency", str(args.concurrency)]
    started = await asyncio.gather(
        *(stack.start(f"worker-{i + 1}", worker, stop) for i in range(args.workers))
    )
    return None if None in started else ports


def _base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


async def _tenant_key(api_url: str, token: str, tenant: str) -> str:
    """Create ``tenant`` (when absent) with the starter policy, and a new key for it."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    url = f"{api_url}/admin/tenants/{tenant}"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(url) as resp:
            if resp.status not in (200, 404):
                raise CliError(f"GET {url}: HTTP {resp.status}: {await resp.text()}")
            exists = resp.status == 200
        if not exists:
            async with http.put(url, json=STARTER_POLICY) as resp:
                if resp.status not in (200, 201):
                    raise CliError(f"PUT {url}: HTTP {resp.status}: {await resp.text()}")
        async with http.post(f"{url}/keys") as resp:
            if resp.status not in (200, 201):
                raise CliError(f"POST {url}/keys: HTTP {resp.status}: {await resp.text()}")
            return str((await resp.json())["key"])


def _print_banner(
    stack: Stack,
    args: argparse.Namespace,
    api_url: str,
    redis: str,
    token: str,
    generated: bool,
    key: str | None,
) -> None:
    workers = [c for c in stack.children if c.name.startswith("worker-")]
    upstream = stack.env.get("BUDGETER_UPSTREAM_URL", "http://127.0.0.1:8788")
    pids = " ".join(f"{c.name}={c.proc.pid}" for c in stack.children)
    shown_token = token if generated else "$BUDGETER_ADMIN_TOKEN (yours)"
    lines = [
        "budgeter is up (Ctrl-C or SIGTERM stops it)",
        f"  api          {api_url}",
        f"  workers      {len(workers)} x {args.concurrency} lanes",
        f"  upstream     {upstream}{' (mock)' if args.mock else ''}",
        f"  redis        {redis} (keeps running after this; `budgeter redis stop` stops it)",
        f"  admin token  {shown_token}",
        f"  pids         {pids}",
        "",
        "Point the anthropic SDK at it:",
        f"  export ANTHROPIC_BASE_URL={api_url}",
    ]
    if key is not None:
        lines.append(f"  export ANTHROPIC_API_KEY={key}   # tenant {args.tenant}")
    else:
        auth = '-H "Authorization: Bearer $BUDGETER_ADMIN_TOKEN"'
        policy = json.dumps(STARTER_POLICY)
        lines += [
            "  # a tenant and its key first (or run `budgeter up --tenant NAME`):",
            *([f"  export BUDGETER_ADMIN_TOKEN={token}"] if generated else []),
            f"  curl -X PUT {api_url}/admin/tenants/acme {auth} -d '{policy}'",
            f"  curl -X POST {api_url}/admin/tenants/acme/keys {auth}",
            '  export ANTHROPIC_API_KEY=...   # the "key" it answered',
        ]
    print("\n".join(lines), flush=True)
