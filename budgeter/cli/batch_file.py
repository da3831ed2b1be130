"""Reading a JSONL file of Message Batches requests for ``budgeter submit``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import ValidationError

from budgeter.cli.errors import CliError, InputFileError
from budgeter.domain.messages import (
    MAX_BATCH_REQUESTS,
    BatchRequest,
    JsonInputError,
    first_error,
    parse_json,
)


def read_batch_file(path: Path) -> list[BatchRequest]:
    """Every line a Message Batches request; all problems reported, one line each."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    requests: list[BatchRequest] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    with handle:
        for number, line in _numbered_lines(handle):
            if not line.strip():
                continue
            try:
                request = _batch_request(line)
            except _BadLine as exc:
                problems.append(f"{path}:{number}: {exc}")
                continue
            if request.custom_id in seen:
                problems.append(
                    f"{path}:{number}: custom_id {request.custom_id!r} already used on line "
                    f"{seen[request.custom_id]}"
                )
                continue
            seen[request.custom_id] = number
            requests.append(request)
    if problems:
        raise InputFileError(problems)
    if not requests:
        raise CliError(f"{path}: no requests in file")
    if len(requests) > MAX_BATCH_REQUESTS:
        raise CliError(
            f"{path}: {len(requests)} requests; a batch holds at most {MAX_BATCH_REQUESTS}"
        )
    return requests


def _numbered_lines(handle: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(number, line) of a binary file; CR, LF and CRLF end a line, as in text mode."""
    number = 0
    for chunk in handle:
        for line in chunk.replace(b"\r\n", b"\n").split(b"\r"):
            number += 1
            yield number, line


class _BadLine(ValueError):
    """One bad line of a batch file (the message names what is wrong)."""


def _batch_request(line: bytes) -> BatchRequest:
    try:
        value = parse_json(line)
    except JsonInputError as exc:
        raise _BadLine(f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _BadLine("a request must be a JSON object")
    try:
        return BatchRequest.model_validate(value)
    except ValidationError as exc:
        raise _BadLine(first_error(exc)) from None
