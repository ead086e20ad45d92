"""The ``consumer`` command line.

Exit codes: 0 success (including a graceful stop on SIGTERM or SIGINT),
1 runtime failure, 2 invalid usage or configuration, 3 a service
(Kafka or PostgreSQL) could not be reached.
Errors go to stderr as one line without a traceback; ``-v`` adds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from consumer import cli_dead_letters, cli_operations, cli_replay, errors, logs, settings

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "EXIT_UNAVAILABLE", "build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3

_ENV = settings.env_var_names()


def _env_help(text: str, path: str) -> str:
    return f"{text} [env {_ENV[path]}]"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at DEBUG and show tracebacks of errors.")
    parser.add_argument("--log-format", choices=["text", "json"], help=_env_help("Log format.", "log.format"))
    parser.add_argument(
        "--bootstrap-servers", help=_env_help("Kafka brokers as host:port, comma-separated.", "kafka.bootstrap_servers")
    )
    parser.add_argument(
        "--database-url", help=_env_help("PostgreSQL URL (postgresql://user:password@host/db).", "postgres.dsn")
    )
    parser.add_argument("--schema", help=_env_help("Schema of the framework's tables.", "postgres.schema"))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; the CLI reference in the docs is generated from it."""
    parser = argparse.ArgumentParser(
        prog="consumer",
        description="Run Kafka consumers whose PostgreSQL effects happen exactly once.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="Consume with a handler until SIGTERM or SIGINT.")
    run.add_argument("handler", help="Handler class as module:ClassName, e.g. my_app.handlers:OrderHandler.")
    run.add_argument("--topics", help=_env_help("Topics, comma-separated; overrides the handler's.", "kafka.topics"))
    run.add_argument("--group-id", help=_env_help("Consumer group; overrides the handler's.", "kafka.group_id"))
    run.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help=_env_help("Time in-flight messages get to finish on SIGTERM.", "worker.shutdown_timeout_s"),
    )
    run.add_argument(
        "--health-port", type=int, help=_env_help("Port of /healthz, /readyz and /metrics.", "worker.health_port")
    )
    _add_common(run)

    migrate = commands.add_parser("migrate", help="Create or update the database schema.")
    migrate.add_argument(
        "--handler",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="Also apply this handler's own migrations folder; repeatable.",
    )
    _add_common(migrate)

    demo = commands.add_parser(
        "demo",
        help="Run the quake-store example end to end, with duplicates and a crash, and print a summary.",
    )
    demo.add_argument("--input", metavar="FILE.jsonl", help="Events to publish, one JSON object per line.")
    demo.add_argument("--partitions", type=int, default=4, help="Partitions of the demo topic (default 4).")
    demo.add_argument("--seed", type=int, default=7, help="Seed of the duplicate injection (default 7).")
    demo.add_argument("--no-crash", action="store_true", help="Do not SIGKILL the worker part-way through.")
    demo.add_argument(
        "--poison",
        type=int,
        default=0,
        metavar="N",
        help="Also publish N broken events (no entity field), which end as dead letters (default 0).",
    )
    demo.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="Give up after this long.")
    _add_common(demo)

    cli_dead_letters.add_parser(commands, _add_common)
    cli_replay.add_parsers(commands, _add_common)
    cli_operations.add_parsers(commands, _add_common)

    config = commands.add_parser("config", help="Print the effective settings with secrets masked.")
    _add_common(config)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {"kafka": {}, "postgres": {}, "worker": {}, "log": {}}
    mapping: list[tuple[str, str, str]] = [
        ("bootstrap_servers", "kafka", "bootstrap_servers"),
        ("topics", "kafka", "topics"),
        ("group_id", "kafka", "group_id"),
        ("database_url", "postgres", "dsn"),
        ("schema", "postgres", "schema"),
        ("shutdown_timeout", "worker", "shutdown_timeout_s"),
        ("health_port", "worker", "health_port"),
        ("log_format", "log", "format"),
    ]
    for attribute, group, field in mapping:
        value = getattr(args, attribute, None)
        if value is not None:
            overrides[group][field] = value
    if getattr(args, "verbose", False):
        overrides["log"]["level"] = "DEBUG"
    return {group: values for group, values in overrides.items() if values}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(args.verbose)
    try:
        config = settings.load(**_overrides(args))
        logs.configure(config.log.level, config.log.format)
        command = _COMMANDS[args.command]
        return command(args, config)
    except errors.ConfigurationError as exc:
        return _fail(exc, EXIT_CONFIG, verbose)
    except errors.HandlerRegistrationError as exc:
        return _fail(exc, EXIT_CONFIG, verbose)
    except errors.InfrastructureError as exc:
        return _fail(exc, EXIT_UNAVAILABLE, verbose)
    except errors.ConsumerError as exc:
        return _fail(exc, EXIT_FAILURE, verbose)
    except Exception as exc:
        # An error the framework did not expect, often from a handler's
        # import or set-up: one line by default, the traceback with -v.
        detail = f"unexpected {type(exc).__name__}: {exc}" + ("" if verbose else " (run with -v for the traceback)")
        return _fail(errors.ConsumerError(detail), EXIT_FAILURE, verbose)


def _fail(exc: BaseException, code: int, verbose: bool) -> int:
    if verbose:
        logger.error("%s", exc, exc_info=exc, extra={"action": "command_failed"})
    print(f"error: {exc}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace, config: settings.Settings) -> int:
    from consumer.handler import load_handler
    from consumer.worker import Worker

    handler_class = load_handler(args.handler)
    worker = Worker(handler_class(), config)
    try:
        anyio.run(_run_until_signal, worker, backend="asyncio")
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    return EXIT_OK


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """Return the error that ended the worker, preferring the framework's own, from nested task groups."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for leaf in leaves:
        if isinstance(leaf, errors.ConsumerError):
            return leaf
    return leaves[0]


async def _run_until_signal(worker: Any) -> None:
    async with anyio.create_task_group() as task_group:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                count = 0
                async for signum in received:
                    count += 1
                    if count == 1:
                        logger.info(
                            "received %s: stopping gracefully",
                            signal.Signals(signum).name,
                            extra={"action": "signal_received"},
                        )
                        worker.stop()
                    else:
                        logger.warning("second signal: stopping now", extra={"action": "signal_received"})
                        task_group.cancel_scope.cancel()

        async def run_worker() -> None:
            try:
                await worker.run()
            finally:
                task_group.cancel_scope.cancel()

        task_group.start_soon(watch_signals)
        task_group.start_soon(run_worker)


def _migrate(args: argparse.Namespace, config: settings.Settings) -> int:
    anyio.run(_migrate_async, args, config, backend="asyncio")
    return EXIT_OK


async def _migrate_async(args: argparse.Namespace, config: settings.Settings) -> None:
    from consumer import db, migrations
    from consumer.handler import load_handler

    sources = [(migrations.FRAMEWORK_NAMESPACE, migrations.framework_migrations_dir())]
    for path in args.handler:
        handler_class = load_handler(path)
        if handler_class.migrations is None:
            raise errors.ConfigurationError(f"handler {path} has no migrations folder; set its `migrations` attribute")
        sources.append((handler_class.group_id, handler_class.migrations))
    connection = await db.connect(config.postgres)
    try:
        for namespace, folder in sources:
            applied = await migrations.migrate(
                connection, config.postgres.schema_name, namespace, migrations.discover(folder)
            )
            for migration in applied:
                print(f"applied {namespace} {migration.name}")
    finally:
        await connection.close()


def _demo(args: argparse.Namespace, config: settings.Settings) -> int:
    from consumer import demo

    return demo.main(args, config)


def _config(args: argparse.Namespace, config: settings.Settings) -> int:
    print(json.dumps(config.redacted(), indent=2, sort_keys=True))
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, settings.Settings], int]] = {
    "run": _run,
    "migrate": _migrate,
    "demo": _demo,
    "config": _config,
    "dead-letters": cli_dead_letters.run,
    "replay": cli_replay.run_replay,
    "prune": cli_replay.run_prune,
    "status": cli_operations.run_status,
    "healthcheck": cli_operations.run_healthcheck,
}
