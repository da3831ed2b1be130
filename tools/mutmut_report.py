"""Score per module of the last ``mutmut run`` (issue 21), and its survivors.

Reads ``mutmut results --all true`` (one ``<mutant name>: <status>`` line per mutant),
prints killed / all per module, appends the survivors to ``mutation-survivors.txt`` (or
``--survivors``) and exits 1 when a module is below ``--target`` percent (with ``--check``).

A survivor accepted as equivalent in ``tools/mutmut_equivalents.jsonl`` (one JSON object
per line: ``function``, the mutant's ``before`` and ``after`` lines, ``why``) is listed
with its reason and left out of its module's score, as the Lua runner does with
``tools/lua_equivalents.txt``. Entries are keyed by the function and the changed lines
(read with ``mutmut show``), not by the mutant's number, which moves when the function is
edited; an entry that matches no survivor of the run is reported as stale.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "tools" / "mutmut_equivalents.jsonl"
LINE = re.compile(r"^\s*(\S+?)(?:\.x_|\.xǁ)\S*:\s*(\S+.*)$")
KILLED = {"killed", "timeout", "caught by type check"}
SKIPPED = {"not checked", "skipped"}


@dataclass(frozen=True)
class Equivalent:
    function: str  # the mutant's name up to "__mutmut_"
    before: str  # the removed lines, stripped, joined by newlines
    after: str  # the added lines, the same way
    why: str


def function_of(mutant: str) -> str:
    return mutant.split("__mutmut_")[0]


def parse_equivalents(lines: Iterable[str]) -> list[Equivalent]:
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
            entries.append(Equivalent(raw["function"], raw["before"], raw["after"], raw["why"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{EQUIVALENTS.name}:{number}: not an entry ({exc})") from exc
    return entries


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and the added lines of a ``mutmut show`` diff, each stripped."""
    before, after = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            before.append(line[1:].strip())
        elif line.startswith("+"):
            after.append(line[1:].strip())
    return "\n".join(before), "\n".join(after)


def match(mutant: str, diff: str, entries: list[Equivalent]) -> Equivalent | None:
    before, after = changed_lines(diff)
    for entry in entries:
        if (entry.function, entry.before, entry.after) == (function_of(mutant), before, after):
            return entry
    return None


def mutmut_show(mutmut: Path) -> Callable[[str], str]:
    def show(name: str) -> str:
        return subprocess.run(
            [str(mutmut), "show", name], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    return show


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--survivors", default=str(ROOT / "mutation-survivors.txt"))
    parser.add_argument("--target", type=float, default=90.0)
    parser.add_argument("--check", action="store_true", help="exit 1 below the target")
    options = parser.parse_args()
    mutmut = Path(sys.executable).with_name("mutmut")
    answer = subprocess.run(
        [str(mutmut), "results", "--all", "true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    entries = (
        parse_equivalents(EQUIVALENTS.read_text().splitlines()) if EQUIVALENTS.exists() else []
    )
    show = mutmut_show(mutmut)
    killed: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    equivalent: dict[str, int] = defaultdict(int)
    survivors: list[str] = []
    used: set[Equivalent] = set()
    ran: set[str] = set()  # functions with a mutant checked in this run
    for line in answer.stdout.splitlines():
        found = LINE.match(line)
        if not found:
            continue
        module, status = found.group(1), found.group(2).strip()
        if status in SKIPPED:
            continue
        total[module] += 1
        name = line.strip().split(":")[0]
        ran.add(function_of(name))
        if status in KILLED:
            killed[module] += 1
            continue
        entry = match(name, show(name), entries) if entries else None
        if entry is not None:
            equivalent[module] += 1
            used.add(entry)
            survivors.append(f"{name}  [{status}, equivalent: {entry.why}]")
        else:
            survivors.append(f"{name}  [{status}]")
    below = []
    print("Python mutation score (mutmut; equivalents left out):")
    for module in sorted(total):
        counted = total[module] - equivalent[module]
        score = 100.0 * killed[module] / counted if counted else 100.0
        print(
            f"  {module:36} {killed[module]:5}/{counted:<5} killed  {score:5.1f} %"
            f"  ({equivalent[module]} equivalent)"
        )
        if score < options.target:
            below.append(module)
    with Path(options.survivors).open("a") as out:
        out.write("# Python mutants that no test killed (mutmut show <name>)\n")
        out.writelines(f"{line}\n" for line in survivors)
    print(f"survivors: {options.survivors}")
    for entry in entries:
        if entry not in used and entry.function in ran:
            print(f"stale equivalent (no such survivor): {entry.function}: {entry.before!r}")
    if below:
        print(f"below {options.target:.0f} %: {', '.join(below)}")
    return 1 if below and options.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
