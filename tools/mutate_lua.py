"""A small mutation tester for budgeter's Lua scripts (issue 21).

Each mutant is one change to one ``budgeter/lua/**/*.lua`` file, in code only (never in a
comment or a string):

- a comparison flipped: ``<`` <-> ``<=``, ``>`` <-> ``>=``;
- arithmetic changed: a binary ``+`` <-> ``-``;
- a statement dropped: a one-line call that writes or answers (``redis.call(...)``, the
  shared helpers ``hset``/``hdel``/``hincrby``/``add``/``flush``), refunds included.

The mutant is never written to disk: the runner (each of its processes) replaces
``budgeter.store.scripts.lua_source`` so that the scripts registered by the tests get the
mutated text, then runs the fast Lua-facing tests in-process (``pytest.main``) that call
that script (found by one unmutated run that records which test runs which script), and
stops at the first failure (``-x``). A mutant is killed when a test fails. The package's
files are only read, so the runner can run beside anyone editing the tree.

A mutant of the admission scripts (or of a helper they include) that the example tests
let survive gets a second stage: the admission property test
(``tests/admission/test_admission_property.py``, derandomized) with
``--property-examples`` examples after its fixed scenarios (too slow to run for every
mutant; 0 skips the stage).

``--jobs N`` (default ``MUTATE_JOBS``, else the cores, at most 4) splits the mutants
over N processes of this script (``--shard i/N --shard-out FILE``: each records for
itself, runs the mutants whose index % N == i, prints its survivors prefixed with its
shard, and writes its outcomes as JSON into a temporary directory of its own, which is
also its ``TMPDIR``, so pytest's temp dirs, its redis-servers' data and
``BUDGETER_DATA_DIR`` are its own; the redis-servers bind free ports). The parent merges
them into the same report, survivors file and exit code as one process; a shard that
crashes, or saw other mutants (a ``.lua`` file edited as they started), ends the run in
one line with no score. ``--jobs 1`` runs everything in this one process.

Prints a score per module, writes the survivors to ``mutation-survivors.txt`` (or
``--survivors``); with ``--check``, exits 1 when a module is below ``--target`` percent.
A survivor listed in ``tools/lua_equivalents.txt`` (each with why it is equivalent) is
not counted against its module: the score is killed / (mutants - accepted equivalents).
A listed mutant that a test kills, or that no longer exists, is reported so the list
stays true.

    .venv/bin/python tools/mutate_lua.py                 # every mutant
    .venv/bin/python tools/mutate_lua.py --only queue/   # scripts whose path contains it
    .venv/bin/python tools/mutate_lua.py --jobs 1        # in this process alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from budgeter.store.types import ScriptArg, ScriptReply

Fallback = Callable[[], Awaitable[ScriptReply]] | None
ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "budgeter" / "lua"
TESTS = [
    "tests/admission/test_admission.py",
    "tests/admission/test_chain.py",  # reserve.lua's check-only item, meta, key scopes
    "tests/admission/test_key_scope_one_call.py",  # reserve.lua's key scope (KEYS[9..16])
    "tests/admission/test_next_request.py",  # reserve.lua's ADMIT until (the next request)
    "tests/admission/test_pause.py",
    "tests/admission/test_reserve_bookkeeping.py",
    "tests/admission/test_settle_bookkeeping.py",
    "tests/admission/test_usd_bookkeeping.py",
    "tests/admission/test_notify_thresholds.py",  # settle.lua's budget notifications
    "tests/admission/test_rollups.py",  # settle.lua's per-minute rollups
    "tests/ledger/test_settle_ledger.py",  # settle.lua's ledger entries and per-key usage
    "tests/queue/",
    "tests/notify/test_queue_events.py",  # ack.lua's and cancel.lua's events (lib/events.lua)
    "tests/api/test_app.py",
    "tests/api/test_admin_consistency.py",  # tenants/key_used.lua
    "tests/tenants/test_merge_patch.py",  # tenants/replace_policy.lua
    "tests/tenants/test_tree_store.py",  # tenants/tree_set.lua
]
# tests that run a script by its text (EVAL, or a sync client's Script), which the
# recording run cannot see
PROPERTY = "tests/admission/test_admission_property.py"
SCENARIOS = f"{PROPERTY}::test_the_scenarios_alone_reach_every_outcome"
EXTRA = {
    "lib/periods.lua": [f"{PROPERTY}::test_calendar_periods_match_lua_periods"],
    "admission/reserve.lua": [SCENARIOS],
    "admission/settle.lua": [SCENARIOS],
    "admission/mark_sent.lua": [SCENARIOS],
    "lib/prices.lua": [SCENARIOS],
    "lib/hash_cache.lua": [SCENARIOS],
}
# the second stage: run only for a mutant that survived the first
SECOND = f"{PROPERTY}::test_lua_admission_matches_the_reference_model"
SECOND_STAGE = {"admission/reserve.lua", "admission/settle.lua", "admission/mark_sent.lua"}
SECOND_STAGE |= {"lib/prices.lua", "lib/hash_cache.lua"}
EQUIVALENTS = ROOT / "tools" / "lua_equivalents.txt"
NEEDS = re.compile(r"^-- needs: (\S+\.lua)$", re.MULTILINE)
WRITES = re.compile(r"^(redis\.call\(|hset\(|hdel\(|hincrby\(|add\(|flush\(\))")
COMPARE = re.compile(r"<=|>=|<|>")
FLIP = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}
ARITH = re.compile(r"(?<=[\w)\]]) ([+-]) (?=[\w(#])")


@dataclass(frozen=True)
class Mutant:
    script: str  # path under budgeter/lua/
    line: int
    kind: str
    before: str
    after: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies the mutant across edits elsewhere in its script (no line number)."""
        return (self.script, self.kind, self.before.strip(), self.after.strip())

    def describe(self) -> str:
        return f"{self.script}:{self.line} {self.kind}: {self.before.strip()!r} -> " + (
            f"{self.after.strip()!r}" if self.after.strip() else "(dropped)"
        )


def code_mask(text: str) -> list[bool]:
    """For every character of a Lua text: is it code (not a comment, not a string)."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("--", i):
            block = re.match(r"--\[(=*)\[", text[i:])
            if block:
                end = text.find("]" + block.group(1) + "]", i)
                end = n if end < 0 else end + len(block.group(1)) + 2
            else:
                end = text.find("\n", i)
                end = n if end < 0 else end
            for j in range(i, end):
                mask[j] = False
            i = end
        elif text[i] in "'\"":
            quote, j = text[i], i + 1
            while j < n and text[j] != quote:
                j += 2 if text[j] == "\\" else 1
            for k in range(i, min(j + 1, n)):
                mask[k] = False
            i = j + 1
        else:
            i += 1
    return mask


def mutants_of(script: str, text: str) -> Iterator[tuple[Mutant, str]]:
    """Every mutant of ``text`` with the mutated text."""
    mask = code_mask(text)
    lines = text.splitlines(keepends=True)
    start = 0
    for number, line in enumerate(lines, 1):
        code = "".join(c if mask[start + k] else " " for k, c in enumerate(line))

        def replaced(at: int, old: str, new: str, line: str = line, begin: int = start) -> str:
            changed = line[:at] + new + line[at + len(old) :]
            return text[:begin] + changed + text[begin + len(line) :]

        for match in COMPARE.finditer(code):
            old = match.group()
            if code[match.start() - 1 : match.start()] in "<>=~" and match.start() > 0:
                continue  # part of another operator
            new = FLIP[old]
            after = line[: match.start()] + new + line[match.end() :]
            yield (
                Mutant(script, number, "compare", line, after),
                replaced(match.start(), old, new),
            )
        for match in ARITH.finditer(code):
            sign = match.group(1)
            at = match.start(1)
            new = "-" if sign == "+" else "+"
            after = line[:at] + new + line[at + 1 :]
            yield Mutant(script, number, "arith", line, after), replaced(at, sign, new)
        stripped = code.strip()
        if WRITES.match(stripped) and stripped.count("(") == stripped.count(")"):
            dropped = "\n" if line.endswith("\n") else ""
            yield (
                Mutant(script, number, "drop", line, dropped),
                text[:start] + dropped + text[start + len(line) :],
            )
        start += len(line)


def parse_equivalent(line: str) -> tuple[tuple[str, str, str, str], str] | None:
    """One line of tools/lua_equivalents.txt: ``script | kind | before | after | why``
    (``before``/``after`` the stripped line, ``after`` empty for a dropped statement);
    blank lines and ``#`` comments give None."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    parts = [part.strip() for part in line.split(" | ")]
    if len(parts) != 5 or not all(parts[i] for i in (0, 1, 2, 4)):
        raise SystemExit(f"{EQUIVALENTS.name}: not 'script | kind | before | after | why': {line}")
    script, kind, before, after, why = parts
    return (script, kind, before, after), why


def format_equivalent(mutant: Mutant, why: str) -> str:
    """The line of tools/lua_equivalents.txt that accepts ``mutant`` (parse's inverse)."""
    return " | ".join((*mutant.key, why))


def load_equivalents(path: Path = EQUIVALENTS) -> dict[tuple[str, str, str, str], str]:
    if not path.exists():
        return {}
    found = (parse_equivalent(line) for line in path.read_text(encoding="utf-8").splitlines())
    return dict(entry for entry in found if entry)


def scripts() -> dict[str, str]:
    return {
        str(path.relative_to(LUA)): path.read_text(encoding="utf-8")
        for path in sorted(LUA.rglob("*.lua"))
    }


class Patched:
    """Replaces ``lua_source`` so that one script (or helper) reads its mutated text."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = dict(texts)
        self.mutated: dict[str, str] = {}

    def source(self, name: str) -> str:
        text = self.mutated.get(name, self.texts[name])
        helpers = [self.source(h) for h in NEEDS.findall(text)]
        return "\n".join([*helpers, text])

    def install(self) -> None:
        import budgeter.store.scripts as module

        module.lua_source = self.source  # type: ignore[assignment]  # the mutant's text


class Recorder:
    """A pytest plugin: which test runs which script (by the sha of its text)."""

    def __init__(self, shas: dict[str, str]) -> None:
        self.shas = shas
        self.current = ""
        self.calls: dict[str, set[str]] = defaultdict(set)
        self.passed: set[str] = set()

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed:
            self.passed.add(report.nodeid)

    def seen(self, sha: str) -> None:
        name = self.shas.get(sha)
        if name and self.current:
            self.calls[name].add(self.current)


def record(texts: dict[str, str], source: Patched) -> tuple[dict[str, list[str]], set[str]]:
    """One unmutated run: the tests that call each script, and the tests that pass."""
    from redis.commands.core import AsyncScript

    import budgeter.store.scripts as module

    shas = {hashlib.sha1(source.source(n).encode()).hexdigest(): n for n in texts}
    recorder = Recorder(shas)
    command = module.RoundPipeline.command
    call = AsyncScript.__call__

    def recorded_command(
        self: module.RoundPipeline,
        *args: ScriptArg,
        fallback: Fallback = None,
        durable: bool = False,
    ) -> asyncio.Future[ScriptReply]:
        if args and args[0] == "EVALSHA":
            recorder.seen(str(args[1]))
        return command(self, *args, fallback=fallback, durable=durable)  # passed on

    async def recorded_call(
        self: AsyncScript, keys: object = None, args: object = None, client: object = None
    ) -> object:
        recorder.seen(str(self.sha))
        return await call(self, keys, args, client)  # type: ignore[arg-type]  # passed on

    module.RoundPipeline.command = recorded_command  # type: ignore[method-assign]
    AsyncScript.__call__ = recorded_call  # type: ignore[method-assign]
    try:
        code = run_tests(TESTS, plugins=[recorder])
    finally:
        module.RoundPipeline.command = command  # type: ignore[method-assign]
        AsyncScript.__call__ = call  # type: ignore[method-assign]
    if code not in (0, 1):
        raise SystemExit(f"the unmutated tests could not run (pytest exit {code})")
    users: dict[str, list[str]] = {}
    for name in texts:
        found = set(recorder.calls.get(name, set()))
        for other, other_text in texts.items():  # a helper is tested by its users' tests
            if name in NEEDS.findall(other_text):
                found |= recorder.calls.get(other, set())
        users[name] = sorted(found & recorder.passed) + EXTRA.get(name, [])
    return users, recorder.passed


class Examples:
    """A pytest plugin: the property test draws ``n`` examples (after its fixed ones),
    through the module's ``PROFILE``, which the test applies when it runs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        module = getattr(item, "module", None)
        if module is None or not hasattr(module, "PROFILE"):
            return
        from hypothesis import settings

        original = getattr(module, "_UNMUTATED_PROFILE", module.PROFILE)
        module._UNMUTATED_PROFILE = original
        module.PROFILE = settings(original, max_examples=self.n)


def run_tests(args: list[str], plugins: list[object] | None = None) -> int:
    try:
        return _run_tests(args, plugins)
    except Exception:  # a mutant broke the run itself (e.g. an unraisable warning): killed
        return 1


def _run_tests(args: list[str], plugins: list[object] | None = None) -> int:
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return int(
            pytest.main(
                [
                    "-x",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-o",
                    "timeout=30",
                    "--rootdir",
                    str(ROOT),
                    *args,
                ],
                plugins=plugins or [],
            )
        )


def report(
    total: dict[str, int], killed: dict[str, int], accepted: dict[str, int], target: float
) -> list[str]:
    """Print the score per module (accepted equivalents left out); the modules below target."""
    below = []
    for module in sorted(total):
        counted = total[module] - accepted[module]
        score = 100.0 * killed[module] / counted if counted else 100.0
        print(
            f"  {module:28} {killed[module]:4}/{total[module]:<4} killed, "
            f"{accepted[module]:2} equivalent  {score:5.1f} % of the rest"
        )
        if score < target:
            below.append(module)
    all_killed, all_total = sum(killed.values()), sum(total.values())
    all_counted = all_total - sum(accepted.values())
    if all_counted:
        print(
            f"  {'all':28} {all_killed:4}/{all_total:<4} killed, "
            f"{sum(accepted.values()):2} equivalent  {100.0 * all_killed / all_counted:5.1f} %"
        )
    return below


KILLED, SURVIVED, ACCEPTED = "killed", "survived", "equivalent-accepted"


@dataclass(frozen=True)
class Outcome:
    """What became of one mutant of the chosen list (a shard's results file holds these)."""

    index: int  # its place in the chosen list
    key: tuple[str, str, str, str]
    describe: str
    module: str
    outcome: str  # KILLED, SURVIVED or ACCEPTED
    why: str  # a survivor's note: why it is equivalent, or why no test killed it


def run_mutants(
    chosen: list[tuple[Mutant, str]],
    texts: dict[str, str],
    options: argparse.Namespace,
    shard: tuple[int, int] | None = None,
) -> list[Outcome]:
    """Record, then run the mutants of ``chosen`` (every one, or for ``shard`` (i, N)
    those whose index % N == i) in this process, printing each survivor as it goes."""
    index, count = shard or (0, 1)
    prefix = f"[shard {index}/{count}] " if shard else ""
    picked = [(n, m, t) for n, (m, t) in enumerate(chosen) if n % count == index]
    source = Patched(texts)
    source.install()
    started = time.monotonic()
    users, _ = record(texts, source)
    print(
        f"{prefix}recorded which test runs which script in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    examples = Examples(options.property_examples)
    second = options.property_examples > 0 and any(m.script in SECOND_STAGE for _, m, _ in picked)
    if second and run_tests([SECOND], plugins=[examples]) != 0:
        raise SystemExit(f"the unmutated {SECOND} fails: fix it first")
    equivalents = load_equivalents()
    outcomes = []
    for n, mutant, text in picked:
        module = mutant.script
        tests = users.get(module, [])
        source.mutated = {module: text}
        code = run_tests(tests) if tests else 0
        if code == 0 and second and module in SECOND_STAGE:
            code = run_tests([SECOND], plugins=[examples])
            if code == 1:
                print(f"  {prefix}killed by the property test: {mutant.describe()}", flush=True)
        source.mutated = {}
        if code == 1:
            outcome, why = KILLED, ""
            if mutant.key in equivalents and not shard:  # a sharded run's parent says it
                print(f"  listed as equivalent but killed: {mutant.describe()}", flush=True)
        elif mutant.key in equivalents:
            outcome, why = ACCEPTED, f"equivalent: {equivalents[mutant.key]}"
        else:
            outcome = SURVIVED
            why = "no test runs this script" if not tests else f"pytest exit {code}"
            print(f"  {prefix}survived {n + 1}/{len(chosen)}: {mutant.describe()}", flush=True)
        outcomes.append(Outcome(n, mutant.key, mutant.describe(), module, outcome, why))
    return outcomes


def digest(chosen: list[tuple[Mutant, str]]) -> str:
    """What the parent and its shards check they agree on: the chosen mutants."""
    lines = "".join(f"{m.describe()}\n" for m, _ in chosen)
    return hashlib.sha1(lines.encode()).hexdigest()


def write_shard(
    path: str, shard: tuple[int, int], chosen: list[tuple[Mutant, str]], outcomes: list[Outcome]
) -> None:
    data = {"shard": list(shard), "chosen": digest(chosen), "outcomes": [vars(o) for o in outcomes]}
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def read_shard(
    path: Path, shard: tuple[int, int], chosen: list[tuple[Mutant, str]]
) -> list[Outcome]:
    """A shard's results, checked: the same chosen mutants as the parent's, each of its
    share exactly once. Anything else ends the run in one line."""
    name = f"shard {shard[0]}/{shard[1]}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        outcomes = [
            Outcome(
                int(o["index"]),
                (str(o["key"][0]), str(o["key"][1]), str(o["key"][2]), str(o["key"][3])),
                str(o["describe"]),
                str(o["module"]),
                str(o["outcome"]),
                str(o["why"]),
            )
            for o in data["outcomes"]
        ]
        agrees = data["chosen"] == digest(chosen)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise SystemExit(
            f"mutate_lua: {name} wrote no readable results ({error}): no score"
        ) from None
    if not agrees:
        raise SystemExit(f"mutate_lua: {name} saw other mutants (a .lua file changed): run again")
    share = [n for n in range(len(chosen)) if n % shard[1] == shard[0]]
    if sorted(o.index for o in outcomes) != share or any(
        o.outcome not in (KILLED, SURVIVED, ACCEPTED) for o in outcomes
    ):
        raise SystemExit(f"mutate_lua: {name}'s results are not its share of the mutants: no score")
    return outcomes


def wait_for(children: list[tuple[tuple[int, int], subprocess.Popen[bytes]]]) -> None:
    """Wait for every shard; the first that fails ends the run (the finally of the
    caller stops the others)."""
    running = list(children)
    while running:
        for shard, child in list(running):
            code = child.poll()
            if code is None:
                continue
            running.remove((shard, child))
            if code != 0:
                raise SystemExit(
                    f"mutate_lua: shard {shard[0]}/{shard[1]} crashed (exit {code}) "
                    "before writing its results: no score"
                )
        time.sleep(0.5)


def run_shards(
    chosen: list[tuple[Mutant, str]], options: argparse.Namespace, jobs: int
) -> list[Outcome]:
    """Run the chosen mutants in ``jobs`` processes of this script (``--shard i/N``),
    each with its own temporary directory (``TMPDIR``: pytest's base temp, so its
    redis-servers' data and ``BUDGETER_DATA_DIR``), and merge their results."""
    children: list[tuple[tuple[int, int], subprocess.Popen[bytes]]] = []
    with tempfile.TemporaryDirectory(prefix="mutate-lua-", ignore_cleanup_errors=True) as tmp:
        try:
            for i in range(jobs):
                home = Path(tmp) / f"shard-{i}"
                (home / "tmp").mkdir(parents=True)
                env = dict(os.environ, TMPDIR=str(home / "tmp"))
                env["BUDGETER_DATA_DIR"] = str(home / "data")
                command = [sys.executable, str(Path(__file__).resolve()), f"--only={options.only}"]
                command += [f"--property-examples={options.property_examples}"]
                command += [f"--shard={i}/{jobs}", f"--shard-out={home / 'outcomes.json'}"]
                children.append(((i, jobs), subprocess.Popen(command, cwd=ROOT, env=env)))
            wait_for(children)
        finally:
            for _, child in children:
                if child.poll() is None:
                    child.terminate()
                    child.wait()
        outcomes = [
            o
            for shard, _ in children
            for o in read_shard(Path(tmp) / f"shard-{shard[0]}" / "outcomes.json", shard, chosen)
        ]
    return sorted(outcomes, key=lambda o: o.index)


def summarize(
    chosen: list[tuple[Mutant, str]],
    outcomes: list[Outcome],
    options: argparse.Namespace,
    started: float,
) -> int:
    """Print the scores, write the survivors; the exit code."""
    killed: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    accepted: dict[str, int] = defaultdict(int)
    for outcome in outcomes:
        total[outcome.module] += 1
        killed[outcome.module] += outcome.outcome == KILLED
        accepted[outcome.module] += outcome.outcome == ACCEPTED
    survivors = [f"{o.describe}  [{o.why}]" for o in outcomes if o.outcome != KILLED]
    unused = {key for key in load_equivalents() if options.only in key[0]}
    unused -= {mutant.key for mutant, _ in chosen}
    print(f"\nLua mutation score ({time.monotonic() - started:.0f} s):")
    below = report(total, killed, accepted, options.target)
    for key in sorted(unused):
        print(f"  listed as equivalent, no such mutant now: {' | '.join(key)}")
    Path(options.survivors).write_text(
        "# Lua mutants that no test killed (tools/mutate_lua.py)\n"
        + "".join(f"{line}\n" for line in survivors)
    )
    print(f"survivors: {options.survivors}")
    if below:
        print(f"below {options.target:.0f} %: {', '.join(below)}")
    return 1 if below and options.check else 0


def shard_of(value: str) -> tuple[int, int]:
    """``--shard i/N``: this process runs the mutants whose index % N == i."""
    index, _, count = value.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not i/N: {value}") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"not 0 <= i < N: {value}")
    return shard


def default_jobs() -> int:
    """``MUTATE_JOBS``, else the cores (at most 4)."""
    if os.environ.get("MUTATE_JOBS"):
        return int(os.environ["MUTATE_JOBS"])
    return min(os.cpu_count() or 1, 4)


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="scripts whose path contains this")
    parser.add_argument("--survivors", default=str(ROOT / "mutation-survivors.txt"))
    parser.add_argument("--target", type=float, default=90.0, help="percent killed per module")
    parser.add_argument("--check", action="store_true", help="exit 1 below the target")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument(
        "--property-examples",
        type=int,
        default=100,
        help="examples of the admission property test for the survivors of the example "
        "tests (0: no second stage)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes that run the mutants (default: MUTATE_JOBS, else the cores, at most "
        "4; 1: all in this process)",
    )
    parser.add_argument("--shard", type=shard_of, help=argparse.SUPPRESS)  # a --jobs child
    parser.add_argument("--shard-out", help=argparse.SUPPRESS)  # its results file (JSON)
    options = parser.parse_args()
    if options.shard and not options.shard_out:
        parser.error("--shard needs --shard-out")
    try:
        options.jobs = default_jobs() if options.jobs is None else options.jobs
    except ValueError:
        parser.error(f"MUTATE_JOBS is not a number: {os.environ['MUTATE_JOBS']}")
    if options.jobs < 1:
        parser.error("--jobs must be at least 1")
    return options


def main() -> int:
    options = parse_options()
    sys.path.insert(0, str(ROOT))
    texts = scripts()
    every = [(m, t) for name, text in texts.items() for m, t in mutants_of(name, text)]
    chosen = [(m, t) for m, t in every if options.only in m.script]
    if options.list:
        for mutant, _ in chosen:
            print(mutant.describe())
        print(f"{len(chosen)} mutants")
        return 0
    if options.shard:
        outcomes = run_mutants(chosen, texts, options, options.shard)
        write_shard(options.shard_out, options.shard, chosen, outcomes)
        return 0
    started = time.monotonic()
    jobs = min(options.jobs, len(chosen))
    if jobs > 1:
        outcomes = run_shards(chosen, options, jobs)
        equivalents = load_equivalents()
        for outcome in outcomes:
            if outcome.outcome == KILLED and outcome.key in equivalents:
                print(f"  listed as equivalent but killed: {outcome.describe}", flush=True)
    else:
        outcomes = run_mutants(chosen, texts, options)
    return summarize(chosen, outcomes, options, started)


if __name__ == "__main__":
    raise SystemExit(main())
