"""The accepted-equivalents list of the Lua mutation runner (tools/lua_equivalents.txt):
its format round-trips, and every entry names a mutant the runner makes today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tools.tool_module import load_tool

ROOT = Path(__file__).resolve().parents[2]


mutate_lua = load_tool("mutate_lua")


def test_an_entry_round_trips() -> None:
    mutant = mutate_lua.Mutant(
        "sched/pick.lua", 41, "compare", "  if a > b then\n", "  if a >= b then\n"
    )
    line = mutate_lua.format_equivalent(mutant, "the same value")
    assert mutate_lua.parse_equivalent(line) == (mutant.key, "the same value")


def test_a_dropped_statement_round_trips() -> None:
    mutant = mutate_lua.Mutant("queue/ack.lua", 3, "drop", "redis.call('DEL', KEYS[1])\n", "\n")
    line = mutate_lua.format_equivalent(mutant, "why")
    assert mutate_lua.parse_equivalent(line) == (mutant.key, "why")


@pytest.mark.parametrize("line", ["", "   ", "# a comment"])
def test_blank_and_comment_lines_are_skipped(line: str) -> None:
    assert mutate_lua.parse_equivalent(line) is None


@pytest.mark.parametrize(
    "line", ["a | b | c", "a | compare | x | y | ", " | compare | x | y | why"]
)
def test_a_malformed_entry_is_refused_in_one_line(line: str) -> None:
    with pytest.raises(SystemExit, match=re.escape("not 'script | kind")):
        mutate_lua.parse_equivalent(line)


def test_every_listed_equivalent_is_a_mutant_of_today() -> None:
    listed = mutate_lua.load_equivalents()
    assert listed, "tools/lua_equivalents.txt is empty"
    made = {
        mutant.key
        for name, text in mutate_lua.scripts().items()
        for mutant, _ in mutate_lua.mutants_of(name, text)
    }
    assert set(listed) - made == set()
