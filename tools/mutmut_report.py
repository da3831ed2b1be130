"""Score per module of the last ``mutmut run`` (issue 21), and its survivors.

Reads ``mutmut results --all true`` (one ``<mutant name>: <status>`` line per mutant),
prints killed / all per module, appends the survivors to ``mutation-survivors.txt`` (or
``--survivors``) and exits 1 when a module is below ``--target`` percent (with ``--check``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\s*(\S+?)(?:\.x_|\.xǁ)\S*:\s*(\S+.*)$")
KILLED = {"killed", "timeout", "caught by type check"}
SKIPPED = {"not checked", "skipped"}


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
    killed: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    survivors = []
    for line in answer.stdout.splitlines():
        found = LINE.match(line)
        if not found:
            continue
        module, status = found.group(1), found.group(2).strip()
        if status in SKIPPED:
            continue
        total[module] += 1
        if status in KILLED:
            killed[module] += 1
        else:
            survivors.append(f"{line.strip().split(':')[0]}  [{status}]")
    below = []
    print("Python mutation score (mutmut):")
    for module in sorted(total):
        score = 100.0 * killed[module] / total[module]
        print(f"  {module:36} {killed[module]:5}/{total[module]:<5} killed  {score:5.1f} %")
        if score < options.target:
            below.append(module)
    with Path(options.survivors).open("a") as out:
        out.write("# Python mutants that no test killed (mutmut show <name>)\n")
        out.writelines(f"{line}\n" for line in survivors)
    print(f"survivors: {options.survivors}")
    if below:
        print(f"below {options.target:.0f} %: {', '.join(below)}")
    return 1 if below and options.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
