"""``budgeter mock-upstream``: serve the built-in mock Messages API until SIGTERM."""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from budgeter.domain.messages import first_error
from budgeter.serving import listen_url, serve_app, stop_event_on_signals
from budgeter.upstream.mock import MockConfig, create_app

log = logging.getLogger("budgeter.mock_upstream")


class MockArgsError(ValueError):
    pass


def mock_config_from_args(args: argparse.Namespace) -> MockConfig:
    kinds = [kind.strip() for kind in args.fault_kinds.split(",") if kind.strip()]
    try:
        return MockConfig(
            latency_ms=args.latency_ms,
            fault_rate=args.fault_rate,
            fault_kinds=kinds,
            retry_after_s=args.retry_after,
            seed=args.seed,
            strict=not getattr(args, "lenient", False),
        )
    except ValidationError as exc:
        raise MockArgsError(f"invalid mock option: {first_error(exc)}") from None


async def run_mock_upstream(args: argparse.Namespace) -> int:
    config = mock_config_from_args(args)
    stop = stop_event_on_signals()
    app = create_app(config)
    reuse_port = bool(getattr(args, "reuse_port", False))
    async with serve_app(
        app, args.host, args.port, port_file=args.port_file, reuse_port=reuse_port
    ) as port:
        mode = "strict" if config.strict else "lenient"
        log.info("listening on %s", listen_url(args.host, port), extra={"mode": mode})
        await stop.wait()
    log.info("mock upstream stopped")
    return 0
