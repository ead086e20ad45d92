"""``consumer status`` and ``consumer healthcheck``: what operators and container runtimes run against a deployment."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import anyio

from consumer import health, settings, status

__all__ = ["add_parsers", "run_healthcheck", "run_status"]

_HEALTHCHECK_TIMEOUT_S = 3.0
_BROKER_TIMEOUT_S = 10.0

# Exit codes, as in `consumer.cli`.
_EXIT_OK = 0
_EXIT_FAILURE = 1
_EXIT_CONFIG = 2


def add_parsers(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``status`` and ``healthcheck`` on `commands`."""
    status_parser = commands.add_parser(
        "status",
        help="Show each partition's stored position, broker end offset, lag and totals.",
        description=(
            "Show, per dedup scope, topic and partition: the stored position, the broker's end offset, the lag, "
            "when the last batch committed, the applied, duplicate and dead-letter totals, and the dead letters "
            "still waiting. Reads PostgreSQL; the broker is optional."
        ),
    )
    status_parser.add_argument("--group", metavar="DEDUP_SCOPE", help="Only this dedup scope (default: all).")
    status_parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    status_parser.add_argument(
        "--no-broker", action="store_true", help="Do not ask the broker for end offsets; lag is shown as unknown."
    )
    status_parser.add_argument(
        "--broker-timeout",
        type=float,
        default=_BROKER_TIMEOUT_S,
        metavar="SECONDS",
        help=f"Seconds to wait for the broker before showing lag as unknown (default {_BROKER_TIMEOUT_S:g}).",
    )
    add_common(status_parser)

    healthcheck = commands.add_parser(
        "healthcheck",
        help="Probe the local worker's /readyz (or --path) and exit 0 when it returns 200.",
        description=(
            "Send GET to the worker's health server on this host, at CONSUMER_WORKER__HEALTH_PORT. "
            "Exit 0 on 200, 1 on any other status or no response, 2 when no health port is configured."
        ),
    )
    healthcheck.add_argument(
        "--path", choices=["/readyz", "/healthz"], default="/readyz", help="Endpoint to probe (default /readyz)."
    )
    healthcheck.add_argument(
        "--timeout",
        type=float,
        default=_HEALTHCHECK_TIMEOUT_S,
        metavar="SECONDS",
        help=f"Time limit of the request, in seconds (default {_HEALTHCHECK_TIMEOUT_S:g}).",
    )
    add_common(healthcheck)


def run_status(args: argparse.Namespace, config: settings.Settings) -> int:
    """Print the status report; end offsets that cannot be read are shown as unknown, not as an error."""
    report = anyio.run(_collect, args, config, backend="asyncio")
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(report.render())
    return _EXIT_OK


async def _collect(args: argparse.Namespace, config: settings.Settings) -> status.Report:
    return await status.collect(
        config,
        dedup_scope=args.group,
        use_broker=not args.no_broker,
        broker_timeout_s=args.broker_timeout,
    )


def run_healthcheck(args: argparse.Namespace, config: settings.Settings) -> int:
    """Probe the local health server and print one line."""
    port = config.worker.health_port
    if port is None:
        print("healthcheck: no health port configured; set CONSUMER_WORKER__HEALTH_PORT")
        return _EXIT_CONFIG

    host = health.probe_host(config.worker.health_host)
    result = health.probe(host, port, args.path, timeout_s=args.timeout)
    if result.status is None:
        print(f"healthcheck: GET {result.url} failed: {result.error}")
        return _EXIT_FAILURE
    summary = " ".join(result.body.split())[:300]
    print(f"healthcheck: GET {result.url} returned {result.status}: {summary}")
    return _EXIT_OK if result.ok else _EXIT_FAILURE
