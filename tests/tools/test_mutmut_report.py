"""The Python mutation report's accepted equivalents (tools/mutmut_equivalents.jsonl):
every entry parses, and a survivor matches an entry by its function and changed lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools.tool_module import load_tool

ROOT = Path(__file__).resolve().parents[2]


report = load_tool("mutmut_report")

DIFF = """--- budgeter/upstream/token_counter.py
+++ budgeter/upstream/token_counter.py
@@ -10,7 +10,7 @@
         if isinstance(value, dict):
-                return {"type": value["type"]}
+                return {"TYPE": value["type"]}
             return {k: strip(v) for k, v in value.items()}
"""


def test_every_entry_parses_and_names_a_mutated_module() -> None:
    entries = report.parse_equivalents(report.EQUIVALENTS.read_text().splitlines())
    assert entries
    for entry in entries:
        module = entry.function.rsplit(".", 1)[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), entry.function
        assert entry.before != entry.after and entry.why


def test_a_survivor_matches_by_function_and_changed_lines() -> None:
    entries = report.parse_equivalents(report.EQUIVALENTS.read_text().splitlines())
    name = "budgeter.upstream.token_counter.x_local_estimate__mutmut_99"  # any number
    entry = report.match(name, DIFF, entries)
    assert entry is not None and "same length" in entry.why
    other = "budgeter.upstream.token_counter.x_payload_digest__mutmut_21"
    assert report.match(other, DIFF, entries) is None  # another function
    assert report.match(name, DIFF.replace('"TYPE"', '"XXtypeXX"'), entries) is None


def test_the_changed_lines_are_stripped_and_the_file_header_left_out() -> None:
    assert report.changed_lines(DIFF) == (
        'return {"type": value["type"]}',
        'return {"TYPE": value["type"]}',
    )


def test_a_broken_line_is_one_clear_error() -> None:
    with pytest.raises(SystemExit, match=r"mutmut_equivalents.jsonl:2: not an entry"):
        report.parse_equivalents(["# a comment", '{"function": "x"}'])
