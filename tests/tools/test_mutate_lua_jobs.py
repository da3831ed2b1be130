"""The Lua mutation runner's ``--jobs``: a shard's results round-trip to the parent, and a
shard that crashed or saw other mutants ends the run in one line (never a lower score)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.test_lua_equivalents import mutate_lua

CHOSEN = [
    (mutate_lua.Mutant("sched/pick.lua", n, "compare", "a < b\n", "a <= b\n"), "text")
    for n in range(1, 6)
]


def outcome(n: int, result: str) -> object:
    mutant = CHOSEN[n][0]
    return mutate_lua.Outcome(n, mutant.key, mutant.describe(), mutant.script, result, "why")


def test_a_shards_results_round_trip(tmp_path: Path) -> None:
    mine = [outcome(1, mutate_lua.KILLED), outcome(3, mutate_lua.SURVIVED)]
    path = tmp_path / "out.json"
    mutate_lua.write_shard(str(path), (1, 2), CHOSEN, mine)
    assert mutate_lua.read_shard(path, (1, 2), CHOSEN) == mine


def test_a_shard_that_saw_other_mutants_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    mutate_lua.write_shard(str(path), (1, 2), CHOSEN[:4], [outcome(1, mutate_lua.KILLED)])
    with pytest.raises(SystemExit, match="shard 1/2 saw other mutants"):
        mutate_lua.read_shard(path, (1, 2), CHOSEN)


def test_a_shard_missing_some_of_its_share_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    mutate_lua.write_shard(str(path), (1, 2), CHOSEN, [outcome(1, mutate_lua.KILLED)])
    with pytest.raises(SystemExit, match=re.escape("shard 1/2's results are not its share")):
        mutate_lua.read_shard(path, (1, 2), CHOSEN)


def test_a_shard_without_results_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="shard 0/2 wrote no readable results"):
        mutate_lua.read_shard(tmp_path / "none.json", (0, 2), CHOSEN)


def test_a_crashed_shard_ends_the_run() -> None:
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(SystemExit, match=re.escape("shard 1/2 crashed (exit 3)")):
            mutate_lua.wait_for([((0, 2), ok), ((1, 2), crashed)])
    finally:
        ok.wait()
        crashed.wait()


@pytest.mark.parametrize("value", ["2/2", "x/2", "1", "-1/2"])
def test_a_wrong_shard_is_refused(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        mutate_lua.shard_of(value)


def test_a_shard_is_i_of_n() -> None:
    assert mutate_lua.shard_of("1/3") == (1, 3)
