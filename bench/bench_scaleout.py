"""Scale-out: jobs/s with 1, 2 and 4 worker processes, against one Redis, against one
Redis with a replica (the cluster's durability: every write also goes to a replica), and
against a three-master Redis Cluster with one replica per master, with the mock upstream —
side by side in one run.

Everything runs on loopback: embedded redis-servers (the cluster made with redis-cli),
`budgeter mock-upstream` and `budgeter worker` processes. Each run submits one batch per
tenant (4 tenants, no limits), times it from submission until every job ended, then
stops the workers and empties the servers (`FLUSHALL`, outside the timed part).

Noise: on a small machine one run's jobs/s moves by more than the gap between the
setups, so for each worker count the bench runs one Redis (A), one Redis with its replica
(R) and the cluster (B) in turn `--rounds` times, the order reversed every other round
(ARB, BRA, ARB, ...), and reports the median jobs/s of each, the median of the per-round
ratios cluster / one Redis and cluster / one Redis with a replica, and their min-max. A
ratio is taken between runs next to each other in time, so a slow spell of the machine
weighs on both of its sides. The replica's CPU counts with its master's, as the cluster's
replicas count with theirs.

Besides jobs/s it reads the servers' own counters (`INFO stats` of every master, before
and after the timed part; nothing timed):

- commands per job (`total_commands_processed`, each script call one command), all
  masters;
- read events per job (`total_reads_processed`), two ways. A server counts one read event
  each time it reads a client's socket: one per pipeline or lone command a client sends
  and waits for. One Redis therefore gets one read event per round trip, and its figure
  is the round trips per job. On the cluster a round (one pipeline, one script call) is
  split into one pipeline per node whose slots it touches, sent to those nodes
  concurrently; each node counts one read event for it. So
  (a) "all masters", the sum over the masters, counts such a round once per node it
  touches. It is what the cluster's servers pay for the rounds, and an upper bound on
  the number of rounds.
  (b) "busiest master", the read events per job of the master that got the most, counts
  a round at most once (a round sends that node one pipeline or none). It is the figure
  to put next to one Redis's round trips per job: a lower bound on the cluster's rounds,
  equal to them when every round touches that master. Rounds that touch only another
  master (a job's calls go to its tenant's node `{t:<tenant>}` and to the scheduler's
  `{sched}` node, not always in the same round) make it read below.
  So if the cluster makes as many round trips per job as one Redis, one Redis's figure
  lies between (b) and (a).
  The bench's own polling (one status call each 50 ms) is included in all of them.

CPU per job: every redis-server's (`INFO cpu`, replicas included) and the worker
processes' (/proc).

    .venv/bin/python bench/bench_scaleout.py [--jobs 6000] [--rounds 3] [--latency-ms 20]
        [--workers 1,2,4] [--replicas 1]    (replicas per master, of the cluster and of
                                             the one Redis of the middle setup)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis, EmbeddedRedisCluster, free_port
from budgeter.tenants.store import TenantStore

TENANTS = ("t1", "t2", "t3", "t4")
ONE, ONE_REPLICATED, CLUSTER = "one Redis", "one Redis+replica", "3-master cluster"


def batch(tenant: str, n: int) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"{tenant}-{i}",
                "params": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"job {i} of {tenant}"}],
                },
            }
        )
        for i in range(n)
    ]


@dataclass
class Run:
    rate: float  # jobs/s
    seconds: float  # the timed part
    reads: float  # server read events per job, summed over the masters
    reads_busiest: float  # read events per job of the master that got the most
    commands: float  # commands run per job (those inside Lua included), all masters
    redis_cpu_ms: float  # CPU per job of every redis-server (replicas included)
    worker_cpu_ms: float  # CPU per job of the worker processes


@dataclass
class Counters:
    reads: list[int]  # per master, in Servers.masters order
    commands: int
    redis_cpu_s: float
    worker_cpu_s: float

    def per_job(self, later: Counters, jobs: int, seconds: float) -> Run:
        reads = [after - before for before, after in zip(self.reads, later.reads, strict=True)]
        return Run(
            jobs / seconds,
            seconds,
            sum(reads) / jobs,
            max(reads) / jobs,
            (later.commands - self.commands) / jobs,
            (later.redis_cpu_s - self.redis_cpu_s) * 1000 / jobs,
            (later.worker_cpu_s - self.worker_cpu_s) * 1000 / jobs,
        )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Servers:
    masters: list[int]  # ports
    all: list[int]


async def counters(servers: Servers, worker_pids: list[int]) -> Counters:
    """The servers' own counters (``INFO stats`` of the masters, ``INFO cpu`` of every
    server) and the workers' CPU time, now."""
    reads: dict[int, int] = {}
    commands = 0
    cpu = 0.0
    for port in servers.all:
        client = Redis(port=port)
        try:
            info = await client.info()
        finally:
            await client.aclose()
        cpu += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        if port in servers.masters:
            reads[port] = int(info["total_reads_processed"])
            commands += int(info["total_commands_processed"])
    return Counters(
        [reads[port] for port in servers.masters],
        commands,
        cpu,
        sum(process_cpu_s(pid) for pid in worker_pids),
    )


async def flush(servers: Servers) -> None:
    """Empty every master (the replicas follow) so that each run starts from the same
    state and the servers' memory stays bounded over the rounds."""
    for port in servers.masters:
        client = Redis(port=port)
        try:
            await client.flushall()
        finally:
            await client.aclose()


async def in_sync(port: int, replicas: int, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until the master on ``port`` counts ``replicas`` replicas online."""
    client = Redis(port=port)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await client.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            if len(online) == replicas and all(v.get("state") == "online" for v in online):
                return
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise RuntimeError(f"{replicas} replica(s) not in sync within {timeout_s:g} s")


async def one_run(
    url: str, servers: Servers, mock_url: str, workers: int, jobs: int, prefix: str
) -> Run:
    redis = make_redis(url)
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": url,
        "BUDGETER_UPSTREAM_URL": mock_url,
        "BUDGETER_KEY_PREFIX": prefix,
        "BUDGETER_LOG_LEVEL": "ERROR",
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            "worker",
            "--concurrency",
            "32",
            "--metrics-port",
            "0",
            env=env,
        )
        for _ in range(workers)
    ]
    pids = [proc.pid for proc in procs]
    try:
        await asyncio.sleep(2.0)  # let the workers import and connect
        tenants = TenantStore(redis, prefix=prefix)
        store = BatchStore(redis, prefix=prefix)
        for tenant in TENANTS:
            await tenants.put(tenant, TenantPolicy())
        per_tenant = jobs // len(TENANTS)
        bodies = {tenant: batch(tenant, per_tenant) for tenant in TENANTS}
        before = await counters(servers, pids)
        started = time.perf_counter()
        ids = [await store.create(tenant, bodies[tenant]) for tenant in TENANTS]
        for batch_id in ids:  # one status call per poll (Redis is polled: no event to await)
            while True:
                if (await store.status(batch_id)).ended:
                    break
                await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        after = await counters(servers, pids)
        statuses = [await store.status(b) for b in ids]
        done = per_tenant * len(TENANTS)
        assert sum(s.succeeded for s in statuses) == done
        return before.per_job(after, done, elapsed)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await proc.wait()
        await redis.aclose()
        await flush(servers)


@dataclass
class Summary:
    """One worker count's rounds: the runs of one Redis, of one Redis with its replica(s)
    and of the cluster, one of each per round."""

    one: list[Run]
    replicated: list[Run]
    cluster: list[Run]

    @staticmethod
    def median(runs: list[Run], field: str) -> float:
        return statistics.median(float(getattr(run, field)) for run in runs)

    def ratios(self, base: list[Run]) -> list[float]:
        """cluster / ``base`` jobs/s of each round."""
        return [c.rate / o.rate for o, c in zip(base, self.cluster, strict=True)]

    def runs(self, name: str) -> list[Run]:
        return {ONE: self.one, ONE_REPLICATED: self.replicated, CLUSTER: self.cluster}[name]


def print_run(name: str, workers: int, round_no: int, run: Run) -> None:
    print(
        f"round {round_no} {name:17} {workers} worker(s): {run.rate:7.1f} jobs/s "
        f"({run.seconds:4.1f} s); per job read events {run.reads:5.2f} all masters, "
        f"{run.reads_busiest:5.2f} busiest; {run.commands:5.2f} commands; CPU "
        f"{run.redis_cpu_ms:.2f} ms Redis, {run.worker_cpu_ms:.2f} ms workers",
        flush=True,
    )


def print_table(
    summaries: dict[int, Summary], jobs: int, rounds: int, latency_ms: float, replicas: int
) -> None:
    seconds = [run.seconds for s in summaries.values() for run in s.one + s.replicated + s.cluster]
    print()
    print(
        f"{jobs} jobs over {len(TENANTS)} tenants per run, mock latency {latency_ms:g} ms, "
        f"32 coroutines per worker, {os.cpu_count()} cores, cluster: 3 masters x "
        f"{replicas} replica(s), one Redis+replica: {replicas} replica(s); {rounds} round(s) "
        f"of the three per worker count, order reversed every other round; runs "
        f"{min(seconds):.1f}-{max(seconds):.1f} s"
    )
    print(
        "medians over the rounds; jobs/s of one Redis, one Redis+replica (+R), cluster; "
        "ratio = cluster / one Redis and cluster / one Redis+replica of the same round "
        "(median, min-max)"
    )
    print(
        "trips: read events per job (one Redis: round trips; cluster: all = summed over "
        "the masters, max = busiest master); CPU: ms per job (replicas included)"
    )
    print(
        f"{'workers':>7} | {'jobs/s one':>10} {'+R':>6} {'cluster':>7} | {'ratio':>5}"
        f" {'min-max':>9} | {'/+R':>4} {'min-max':>9} | {'trips one':>9} {'all':>5}"
        f" {'max':>5} | {'Redis CPU one':>13} {'+R':>5} {'cluster':>7}"
        f" | {'worker CPU one':>14} {'cluster':>7}"
    )
    for workers, s in summaries.items():
        one, rep, clu = s.one, s.replicated, s.cluster
        ratios, ratios_r = s.ratios(one), s.ratios(rep)
        print(
            f"{workers:>7} | {s.median(one, 'rate'):>10.1f} {s.median(rep, 'rate'):>6.1f}"
            f" {s.median(clu, 'rate'):>7.1f}"
            f" | {statistics.median(ratios):>5.2f} {min(ratios):>4.2f}-{max(ratios):<4.2f}"
            f" | {statistics.median(ratios_r):>4.2f}"
            f" {min(ratios_r):>4.2f}-{max(ratios_r):<4.2f}"
            f" | {s.median(one, 'reads'):>9.2f} {s.median(clu, 'reads'):>5.2f}"
            f" {s.median(clu, 'reads_busiest'):>5.2f}"
            f" | {s.median(one, 'redis_cpu_ms'):>13.2f} {s.median(rep, 'redis_cpu_ms'):>5.2f}"
            f" {s.median(clu, 'redis_cpu_ms'):>7.2f}"
            f" | {s.median(one, 'worker_cpu_ms'):>14.2f} {s.median(clu, 'worker_cpu_ms'):>7.2f}"
        )


async def main(jobs: int, rounds: int, latency_ms: float, counts: list[int], replicas: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        single = EmbeddedRedis(Path(root) / "single", appendonly=False)
        single.start()
        primary = EmbeddedRedis(Path(root) / "primary", appendonly=False)
        primary.start()
        assert primary.port is not None
        copies = [
            EmbeddedRedis(
                Path(root) / f"copy{index}",
                appendonly=False,
                extra_args=["--replicaof", "127.0.0.1", str(primary.port)],
            )
            for index in range(replicas)
        ]
        for copy in copies:
            copy.start()
        await in_sync(primary.port, replicas)
        cluster = EmbeddedRedisCluster(Path(root) / "cluster", replicas=replicas)
        cluster_url = cluster.start()
        assert single.port is not None
        ports = [server.port for server in cluster.servers if server.port is not None]
        setups = {
            ONE: (single.url, Servers([single.port], [single.port])),
            ONE_REPLICATED: (
                primary.url,
                Servers([primary.port], [primary.port, *(c.port for c in copies if c.port)]),
            ),
            CLUSTER: (cluster_url, Servers(cluster.master_ports(), ports)),
        }
        mock_port = free_port()
        mock = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            "mock-upstream",
            "--port",
            str(mock_port),
            "--latency-ms",
            str(latency_ms),
        )
        await asyncio.sleep(1.5)
        summaries: dict[int, Summary] = {}
        try:
            for workers in counts:
                summary = summaries[workers] = Summary([], [], [])
                for round_no in range(1, rounds + 1):
                    order = (ONE, ONE_REPLICATED, CLUSTER)
                    if round_no % 2 == 0:
                        order = order[::-1]
                    for name in order:
                        url, servers = setups[name]
                        run = await one_run(
                            url,
                            servers,
                            f"http://127.0.0.1:{mock_port}",
                            workers,
                            jobs,
                            f"bench{workers}{name[-1]}{round_no}",
                        )
                        summary.runs(name).append(run)
                        print_run(name, workers, round_no, run)
        finally:
            mock.send_signal(signal.SIGTERM)
            await mock.wait()
            single.stop()
            for copy in copies:
                copy.stop()
            primary.stop()
            cluster.stop()
    print_table(summaries, jobs, rounds, latency_ms, replicas)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--jobs", type=int, default=6000, help="jobs per run (6000: >= 5 s with 1 worker)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="paired runs (one Redis + cluster) per worker count"
    )
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument(
        "--replicas", type=int, default=1, help="replicas per master (cluster, one Redis+replica)"
    )
    args = parser.parse_args()
    if not len(TENANTS) <= args.jobs <= 200_000:
        parser.error(f"--jobs must be {len(TENANTS)}..200000")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    counts = [int(x) for x in args.workers.split(",")]
    asyncio.run(main(args.jobs, args.rounds, args.latency_ms, counts, args.replicas))
