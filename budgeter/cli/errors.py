"""The two kinds of user error the CLI reports without a traceback."""

from __future__ import annotations


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class InputFileError(Exception):
    """A bad input file: one line per bad input line, exit status 1."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} bad line(s)")
        self.problems = problems
