"""What the proxied routes carry from the caller to the upstream and back: the
``anthropic-beta`` values (checked against ``BUDGETER_ALLOWED_BETAS`` and the tenant's
``allowed_betas``), the caller's ``anthropic-version`` (sent upstream when
``BUDGETER_UPSTREAM_ANTHROPIC_VERSION=client``), the query parameters, and the upstream's
``request-id`` (answered as ``budgeter-upstream-request-id``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from budgeter.api.appkeys import SETTINGS
from budgeter.api.errors import REQUEST_ID, ApiError
from budgeter.domain.passthrough import (
    BETA_HEADER,
    CLIENT_VERSION,
    VERSION_HEADER,
    Passthrough,
    PassthroughError,
    check_version,
    parse_betas,
    refused_beta,
)
from budgeter.tenants.store import TenantStore

log = logging.getLogger("budgeter.proxy")

UPSTREAM_REQUEST_ID_HEADER = "budgeter-upstream-request-id"
POLICY_CACHE_SECONDS = 1.0  # a policy's allowed_betas is re-read at most this often


def read_passthrough(request: web.Request) -> Passthrough:
    """The caller's betas (every ``anthropic-beta`` header, comma lists), its version (read
    only when it is forwarded) and its query parameters; a malformed value is a 400."""
    try:
        betas = parse_betas(request.headers.getall(BETA_HEADER, []))
    except PassthroughError as exc:
        raise ApiError(400, f"{BETA_HEADER}: {exc}") from None
    version = request.headers.get(VERSION_HEADER)
    if request.app[SETTINGS].upstream_anthropic_version != CLIENT_VERSION:
        version = None  # budgeter sends its own: the caller's is not read at all
    elif version is not None:
        try:
            version = check_version(version.strip())
        except PassthroughError as exc:
            raise ApiError(400, f"{VERSION_HEADER}: {exc}") from None
    return Passthrough(betas, version, tuple(request.query.items()))


def upstream_id_headers(request: web.Request, upstream_id: str | None) -> dict[str, str]:
    """The answer header naming the upstream's request id (logged beside budgeter's own)."""
    if not upstream_id:
        return {}
    log.debug(
        "upstream request id",
        extra={"request_id": request[REQUEST_ID], "upstream_request_id": upstream_id},
    )
    return {UPSTREAM_REQUEST_ID_HEADER: upstream_id}


def check_betas(
    betas: tuple[str, ...], allowed: list[str] | tuple[str, ...] | None, *, tenant: bool = False
) -> None:
    """A 400 naming the first of ``betas`` that ``allowed`` (None: any) does not list: the
    setting's list, or with ``tenant`` the tenant's ``allowed_betas``."""
    refused = refused_beta(betas, allowed)
    if refused is not None:
        whose = "this tenant's allowed_betas" if tenant else "BUDGETER_ALLOWED_BETAS"
        raise ApiError(400, f"{BETA_HEADER}: beta {refused!r} is not in {whose}")


class BetaGate:
    """Which betas a tenant may send: ``allowed`` (the setting; None: any) and then the
    tenant's own ``allowed_betas`` (null: any). A request without betas costs nothing here;
    one with betas reads the tenant's policy at most once a ``POLICY_CACHE_SECONDS``."""

    def __init__(
        self,
        allowed: tuple[str, ...] | None,
        tenants: TenantStore,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed = allowed
        self.tenants = tenants
        self._clock = clock
        self._policies: dict[str, tuple[list[str] | None, float]] = {}

    async def check(self, tenant: str, betas: tuple[str, ...]) -> None:
        """Raise a 400 ``invalid_request_error`` naming the first beta refused."""
        if betas:
            check_betas(betas, self.allowed)
            check_betas(betas, await self._tenant_allowed(tenant), tenant=True)

    async def _tenant_allowed(self, tenant: str) -> list[str] | None:
        now = self._clock()
        cached = self._policies.get(tenant)
        if cached is not None and cached[1] > now:
            return cached[0]
        policy = await self.tenants.get(tenant)
        allowed = policy.allowed_betas if policy is not None else None
        if len(self._policies) > 10_000:
            self._policies.clear()
        self._policies[tenant] = (allowed, now + POLICY_CACHE_SECONDS)
        return allowed
