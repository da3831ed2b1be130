"""The CLI's errors and exit statuses: every failure is one line on stderr, never a
traceback. The statuses (README "Commands" and ``budgeter --help`` list them too):

- 0: done (``submit --wait``: every request succeeded)
- 1: the command was right but could not finish: Redis or the upstream unreachable, a
  Redis error, bad lines in an input file, anything unexpected
- 2: fix the command: bad flags or values, a bad setting, unknown tenant or batch, a port
  in use
- 3: ``submit --wait``: the batch ended with requests not succeeded
- 130: interrupted (SIGINT, Ctrl-C); 143: ``submit --wait`` stopped by SIGTERM
- 141: standard output closed early (``budgeter results ID | head -1``)
"""

from __future__ import annotations

import logging

import aiohttp
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.domain.policy import InvalidTenantError
from budgeter.queue.batches import BatchNotFoundError
from budgeter.queue.jobqueue import UnknownTenantError
from budgeter.serving import ListenError
from budgeter.settings import SettingsError
from budgeter.store.embedded import EmbeddedRedisError
from budgeter.upstream.mock_main import MockArgsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_ALL_SUCCEEDED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # submit --wait stopped by SIGTERM
EXIT_CLOSED_PIPE = 141

log = logging.getLogger("budgeter.cli")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class CliFailure(Exception):
    """The command was right but could not finish (a service unreachable, a batch gone
    while waiting): printed as one line, exit status 1."""


class InputFileError(Exception):
    """A bad input file: one line per bad input line, exit status 1."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} bad line(s)")
        self.problems = problems


# what a user fixes in the command line or the environment: exit status 2
USAGE_ERRORS: tuple[type[Exception], ...] = (
    CliError,
    SettingsError,
    InvalidTenantError,
    UnknownTenantError,
    BatchNotFoundError,
    MockArgsError,
)

# the flag that sets the port each listening command binds
PORT_FLAGS = {"worker": "--metrics-port"}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: Exception, *, command: str | None = None) -> tuple[int, str]:
    """The exit status and the one-line message (without the ``budgeter: error:`` prefix)
    for an exception that ended a command."""
    if isinstance(exc, USAGE_ERRORS):
        return EXIT_USAGE, one_line(str(exc))
    if isinstance(exc, ListenError):
        return EXIT_USAGE, listen_message(exc, PORT_FLAGS.get(command or "", "--port"))
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return EXIT_FAILURE, f"Redis unreachable: {one_line(str(exc))} (BUDGETER_REDIS_URL)"
    if isinstance(exc, RedisError):
        return EXIT_FAILURE, f"Redis: {one_line(str(exc))}"
    if isinstance(exc, aiohttp.ClientConnectionError):
        detail = one_line(str(exc)) or type(exc).__name__
        return EXIT_FAILURE, f"upstream unreachable: {detail} (BUDGETER_UPSTREAM_URL)"
    if isinstance(exc, CliFailure | EmbeddedRedisError):
        return EXIT_FAILURE, one_line(str(exc))
    log.debug("unexpected error", exc_info=exc)
    detail = one_line(str(exc))
    return EXIT_FAILURE, (
        f"unexpected {type(exc).__name__}{': ' + detail if detail else ''} "
        "(BUDGETER_LOG_LEVEL=DEBUG logs the traceback)"
    )


def listen_message(exc: ListenError, flag: str) -> str:
    if exc.in_use:
        return f"port {exc.port} is in use ({flag}, 0 picks a free one)"
    return f"cannot listen on {exc.host}:{exc.port}: {exc.strerror or exc} (--host, {flag})"
