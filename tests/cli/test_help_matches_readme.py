"""The README's command table is the reference of the CLI: every (sub)command the parser
has, recursively, is in the table with exactly the flags its ``--help`` lists, and every
flag the table names exists. Every flag has help that shows its default; ``budgeter
--help`` names the main settings; ``budgeter --version`` prints the package version."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from budgeter.cli.parser import MAIN_SETTINGS, build_parser
from budgeter.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")

CommandPath = tuple[str, ...]
HELP_FLAGS = {"-h", "--help"}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _walk(
    parser: argparse.ArgumentParser, path: CommandPath = ()
) -> Iterator[tuple[CommandPath, argparse.ArgumentParser]]:
    yield path, parser
    for name, child in _subcommands(parser).items():
        yield from _walk(child, (*path, name))


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings ``--help`` lists (long ones; a short one only when it is alone)."""
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        long = {opt for opt in action.option_strings if opt.startswith("--")}
        flags |= long or set(action.option_strings)
    return flags


PARSER = build_parser()
PARSERS = dict(_walk(PARSER))
LEAVES = {path for path, parser in PARSERS.items() if path and not _subcommands(parser)}


def _command_table() -> list[str]:
    start = README.index("## Commands\n")
    section = README[start : README.index("\n## ", start + 1)]
    lines = section.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| command |"))
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _resolve(words: list[str], path: CommandPath = ()) -> list[tuple[CommandPath, list[str]]]:
    """The command paths the leading words name (``a\\|b`` names both) and what follows."""
    children = _subcommands(PARSERS[path])
    if words and children and all(alt in children for alt in words[0].split("|")):
        return [found for alt in words[0].split("|") for found in _resolve(words[1:], (*path, alt))]
    return [(path, words)]


def _readme_commands() -> dict[CommandPath, set[str]]:
    """Command path -> the flags the table's first column names for it (every code span
    of a row, with or without a leading ``budgeter``)."""
    commands: dict[CommandPath, set[str]] = {}
    for row in _command_table():
        first_cell = re.split(r"(?<!\\)\|", row)[1]
        for span in re.findall(r"`([^`]+)`", first_cell):
            words = span.replace("\\|", "|").split()
            if words[:1] == ["budgeter"]:
                words = words[1:]
            for path, rest in _resolve(words):
                flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", " ".join(rest)))
                flags -= HELP_FLAGS  # every parser has them; not compared
                assert path in LEAVES or (path == () and rest), (
                    f"README Commands: `{span}` names no command of the parser"
                )
                commands.setdefault(path, set()).update(flags)
    return commands


def _name(path: CommandPath) -> str:
    return " ".join(("budgeter", *path))


def test_every_command_of_the_parser_has_a_row_in_the_readme() -> None:
    missing = sorted(_name(path) for path in LEAVES - set(_readme_commands()))
    assert not missing, f"README Commands table has no row for {missing}"


@pytest.mark.parametrize("path", sorted([(), *LEAVES]), ids=_name)
def test_the_readme_row_names_exactly_the_flags_of_help(path: CommandPath) -> None:
    in_readme = _readme_commands().get(path, set())
    in_help = _flags(PARSERS[path])
    missing, extra = sorted(in_help - in_readme), sorted(in_readme - in_help)
    assert not missing, f"{_name(path)}: flags missing from the README table: {missing}"
    assert not extra, f"{_name(path)}: the README table names flags that do not exist: {extra}"


@pytest.mark.parametrize("path", sorted(PARSERS), ids=_name)
def test_every_flag_has_help_showing_its_default(path: CommandPath) -> None:
    parser = PARSERS[path]
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{_name(path)} {name}: no help text"
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
            shown = formatter._get_help_string(action) or ""
            assert "default" in shown, f"{_name(path)} {name}: help does not show its default"


def test_help_ends_with_the_main_settings_and_exit_statuses() -> None:
    text = PARSER.format_help()
    epilog = text[text.index("settings (environment variables") :]
    named = re.findall(r"BUDGETER_([A-Z_]+)", epilog)
    for required in ("REDIS_URL", "UPSTREAM_URL", "UPSTREAM_API_KEY", "ADMIN_TOKEN", "DATA_DIR"):
        assert required in named
    assert {name.lower() for name in named} <= set(Settings.model_fields)
    assert set(MAIN_SETTINGS) <= set(Settings.model_fields), "a named setting does not exist"
    for code in ("0", "1", "2", "3", "130", "141"):
        assert re.search(rf"^  {code} ", epilog, re.MULTILINE), f"exit status {code} missing"


def test_version_prints_the_package_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "budgeter", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"budgeter {importlib.metadata.version('budgeter')}\n"
