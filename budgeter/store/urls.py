"""The Redis URL forms ``BUDGETER_REDIS_URL`` takes, in one place: which scheme is which,
the Sentinel form parsed and formatted (:class:`SentinelURL`), and any form with its
password removed for a log line (:func:`redacted_url`).

- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS), ``unix://...``: one
  server, as redis-py reads them;
- ``redis+cluster://[user:password@]host:port``: a Redis Cluster (any node);
- ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/<master>[/db]
  [?sentinel_username=...&sentinel_password=...]``: the master a set of Sentinels names
  (port 26379 when left out). ``user:password`` log in to the master (and to the replica
  it fails over to); the query gives the Sentinels' own login, when they have one.

Passwords and names may hold any character percent-encoded (``%40`` for ``@``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode

SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
SCHEMES = ("redis://", "rediss://", "unix://", CLUSTER_SCHEME, SENTINEL_SCHEME)
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_QUERY = ("sentinel_username", "sentinel_password")


class RedisURLError(ValueError):
    """A Redis URL budgeter cannot use; the message says what is wrong (never a password)."""


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def check_redis_url(url: str) -> str:
    """``url`` when budgeter can use it, else :class:`RedisURLError`."""
    if not url.startswith(SCHEMES):
        raise RedisURLError("must start with " + ", ".join(SCHEMES[:-1]) + " or " + SCHEMES[-1])
    if is_sentinel(url):
        SentinelURL.parse(url)
    return url


def _host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (Sentinel's default port)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise RedisURLError(f"bad Sentinel address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise RedisURLError(f"bad Sentinel address {text!r}: no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisURLError(f"bad Sentinel address {text!r}: the port must be 1-65535")
    return host, int(port_text)


def _format_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _userinfo(username: str | None, password: str | None) -> str:
    if username is None and password is None:
        return ""
    user = quote(username or "", safe="")
    return f"{user}:{quote(password, safe='')}@" if password is not None else f"{user}@"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL: the Sentinels to ask, the master's name and db, the
    master's login and the Sentinels' own login (each None when absent)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        if not is_sentinel(url):
            raise RedisURLError(f"a Sentinel URL starts with {SENTINEL_SCHEME}")
        rest, _, query = url[len(SENTINEL_SCHEME) :].partition("?")
        username = password = None
        if "@" in rest:  # the login ends at the last "@" (tolerates a raw "/" or "@" in it)
            userinfo, _, rest = rest.rpartition("@")
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        netloc, _, path = rest.partition("/")
        if not netloc:
            raise RedisURLError("a Sentinel URL names at least one Sentinel host:port")
        sentinels = tuple(_host_port(part) for part in netloc.split(","))
        master, _, db_text = path.partition("/")
        if not master:
            raise RedisURLError("a Sentinel URL ends with /<master name>[/db]")
        db_text = db_text.rstrip("/")
        if db_text and not db_text.isdigit():
            raise RedisURLError(f"bad db {db_text!r} in a Sentinel URL: a number")
        options = cls._query(query)
        return cls(
            sentinels=sentinels,
            master=unquote(master),
            db=int(db_text or 0),
            username=username,
            password=password,
            sentinel_username=options.get("sentinel_username"),
            sentinel_password=options.get("sentinel_password"),
        )

    @staticmethod
    def _query(query: str) -> dict[str, str]:
        options: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name not in SENTINEL_QUERY:
                known = ", ".join(SENTINEL_QUERY)
                raise RedisURLError(f"unknown option {name!r} in a Sentinel URL (known: {known})")
            options[name] = value
        return options

    def format(self) -> str:
        """The URL that :meth:`parse` reads back as this one."""
        hosts = ",".join(_format_host(host, port) for host, port in self.sentinels)
        url = f"{SENTINEL_SCHEME}{_userinfo(self.username, self.password)}{hosts}"
        url += f"/{quote(self.master, safe='')}/{self.db}"
        query = {
            name: value
            for name, value in (
                ("sentinel_username", self.sentinel_username),
                ("sentinel_password", self.sentinel_password),
            )
            if value is not None
        }
        return f"{url}?{urlencode(query)}" if query else url


def redacted_url(url: str) -> str:
    """``url`` without its password and query (which may carry one), for log lines: the
    user name, hosts, master name and db stay."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.split("?", 1)[0]
    if "@" in rest:  # everything before the last "@" is the login, whatever it holds
        userinfo, _, rest = rest.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}@{rest}" if user else f"{scheme}://{rest}"
    return f"{scheme}://{rest}"
