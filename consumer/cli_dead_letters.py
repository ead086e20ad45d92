"""``consumer dead-letters list | show | redrive | purge``."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from consumer import db, dead_letters, errors, redrive, settings

__all__ = ["add_parser", "run"]

_DEFAULT_LIMIT = 100


def add_parser(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the ``dead-letters`` command and its subcommands on `commands`."""
    parser = commands.add_parser("dead-letters", help="Inspect, redrive or purge dead-lettered messages.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="List dead letters, oldest first.")
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=_DEFAULT_LIMIT, help="Maximum rows (default 100).")
    listing.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    add_common(listing)

    show = actions.add_parser("show", help="Show one dead letter with its bytes, headers and traceback.")
    show.add_argument("id", type=int, help="Dead letter id, as listed.")
    show.add_argument("--json", action="store_true", help="Print JSON.")
    add_common(show)

    redrive_parser = actions.add_parser(
        "redrive",
        help="Apply dead letters again with the handler deployed now; safe to run twice or concurrently.",
    )
    _add_filters(redrive_parser, default_status="dead")
    redrive_parser.add_argument(
        "--handler", metavar="MODULE:CLASS", help="Handler to use instead of the one stored with each dead letter."
    )
    redrive_parser.add_argument("--limit", type=int, default=1000, help="Maximum dead letters (default 1000).")
    redrive_parser.add_argument("--json", action="store_true", help="Print the outcome as JSON.")
    add_common(redrive_parser)

    purge = actions.add_parser("purge", help="Delete dead letters matching a filter, after a confirmation.")
    _add_filters(purge)
    purge.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
    purge.add_argument("--limit", type=int, default=100_000, help="Maximum rows deleted (default 100000).")
    add_common(purge)


def _add_filters(parser: argparse.ArgumentParser, default_status: str | None = None) -> None:
    parser.add_argument("--id", type=int, action="append", default=[], help="Dead letter id; repeatable.")
    parser.add_argument("--group", help="Dedup scope (the group id unless set otherwise).")
    parser.add_argument("--handler-name", help="Handler import path stored with the dead letter.")
    parser.add_argument("--topic", help="Topic.")
    parser.add_argument("--partition", type=int, help="Partition.")
    parser.add_argument("--key", help="Idempotency key, or Kafka key as UTF-8 text.")
    parser.add_argument("--error-type", help="Exception class name of the last error, e.g. ValueError.")
    parser.add_argument("--reason", help="handler_error, permanent, decode, validation, timeout, tombstone, conflict …")
    parser.add_argument(
        "--status",
        default=default_status,
        choices=["dead", "parked", "resolved"],
        help=f"Status (default {default_status or 'any'}).",
    )
    parser.add_argument("--since", type=_timestamp, help="Created at or after, ISO-8601 (e.g. 2026-12-01T00:00Z).")
    parser.add_argument("--until", type=_timestamp, help="Created before, ISO-8601.")


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time such as 2026-12-01T00:00Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or +HH:MM")
    return value


def _filter(args: argparse.Namespace) -> dead_letters.Filter:
    return dead_letters.Filter(
        ids=tuple(getattr(args, "id", []) or ()),
        dedup_scope=args.group,
        handler=args.handler_name,
        topic=args.topic,
        partition=args.partition,
        key=args.key,
        error_type=args.error_type,
        reason=args.reason,
        status=args.status,
        since=args.since,
        until=args.until,
    )


def run(args: argparse.Namespace, config: settings.Settings) -> int:
    """Run the chosen action; return the exit code."""
    action = {"list": _list, "show": _show, "redrive": _redrive, "purge": _purge}[args.action]
    result: int = anyio.run(action, args, config, backend="asyncio")
    return result


async def _connect(config: settings.Settings) -> tuple[asyncpg.Connection, Any]:
    connection = await db.connect(config.postgres)
    return connection, db.load_queries("dead_letters.sql", config.postgres.schema_name)


async def _list(args: argparse.Namespace, config: settings.Settings) -> int:
    connection, queries = await _connect(config)
    try:
        rows = await dead_letters.select(connection, queries, _filter(args), args.limit)
    finally:
        await connection.close()
    if args.json:
        print(json.dumps([_as_json(row, full=False) for row in rows], indent=2))
        return 0
    if not rows:
        print("no dead letters match")
        return 0
    print(f"{'ID':>6}  {'STATUS':<8} {'REASON':<13} {'POSITION':<28} {'ATT':>3}  ERROR")
    for row in rows:
        position = f"{row['topic']}-{row['partition']}@{row['offset']}"
        error = f"{row['last_error_type']}: {row['last_error']}".replace("\n", " ")
        print(
            f"{row['id']:>6}  {row['status']:<8} {row['reason']:<13} {position:<28} {row['attempts']:>3}  {error[:70]}"
        )
    if len(rows) == args.limit:
        print(f"(first {args.limit} shown; raise --limit for more)")
    return 0


async def _show(args: argparse.Namespace, config: settings.Settings) -> int:
    connection, queries = await _connect(config)
    try:
        rows = await dead_letters.select(connection, queries, dead_letters.Filter(ids=(args.id,)), 1)
    finally:
        await connection.close()
    if not rows:
        print(f"error: dead letter {args.id} not found; list them with `consumer dead-letters list`", file=sys.stderr)
        return 1
    data = _as_json(rows[0], full=True)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for name, value in data.items():
        if name in ("traceback", "headers"):
            continue
        print(f"{name:<18} {value}")
    print("headers")
    for header in data["headers"]:
        print(f"  {header['name']}: {header['value']}")
    print("traceback")
    print(data["traceback"])
    return 0


async def _redrive(args: argparse.Namespace, config: settings.Settings) -> int:
    selection = _filter(args)
    connection, queries = await _connect(config)
    try:
        rows = await dead_letters.select(connection, queries, selection, args.limit)
        if selection.status is None:
            rows = [row for row in rows if row["status"] != dead_letters.STATUS_RESOLVED]
        result = await redrive.redrive(connection, queries, [row["id"] for row in rows], handler_override=args.handler)
    finally:
        await connection.close()
    summary = {
        "selected": len(rows),
        "resolved": result.resolved,
        "already_applied": result.already_applied,
        "skipped": result.skipped,
        "failed": result.failed,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"selected {len(rows)}: resolved {len(result.resolved)}, already applied {len(result.already_applied)}, "
            f"skipped {len(result.skipped)} (resolved elsewhere), failed again {len(result.failed)}"
        )
        for dead_letter_id, error in result.failed.items():
            print(f"  {dead_letter_id}: {error}")
    return 1 if result.failed else 0


async def _purge(args: argparse.Namespace, config: settings.Settings) -> int:
    selection = _filter(args)
    if selection.is_empty():
        raise errors.ConfigurationError(
            "purge needs a filter (e.g. --topic, --status resolved, --until); it never deletes everything by default"
        )
    connection, queries = await _connect(config)
    try:
        rows = await dead_letters.select(connection, queries, selection, args.limit)
        if not rows:
            print("no dead letters match")
            return 0
        by_status: dict[str, int] = {}
        for row in rows:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        counts = ", ".join(f"{count} {status}" for status, count in sorted(by_status.items()))
        if not args.yes and not _confirm(f"delete {len(rows)} dead letters ({counts})?"):
            print("nothing deleted")
            return 1
        deleted = await dead_letters.purge(connection, queries, [row["id"] for row in rows])
    finally:
        await connection.close()
    print(f"deleted {deleted} dead letters ({counts})")
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise errors.ConfigurationError(f"{question} needs a confirmation; pass --yes when not on a terminal")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _bytes(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(bytes(value)).decode("ascii")


def _as_json(row: asyncpg.Record, *, full: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": row["id"],
        "status": row["status"],
        "reason": row["reason"],
        "dedup_scope": row["dedup_scope"],
        "handler": row["handler"],
        "topic": row["topic"],
        "partition": row["partition"],
        "offset": row["offset"],
        "idempotency_key": row["idempotency_key"],
        "key": _bytes(row["key"]),
        "attempts": row["attempts"],
        "last_error_type": row["last_error_type"],
        "last_error": row["last_error"],
        "created_at": row["created_at"].isoformat(),
    }
    if full:
        data.update(
            {
                "group_id": row["group_id"],
                "timestamp_ms": row["timestamp_ms"],
                "value": _bytes(row["value"]),
                "first_error_type": row["first_error_type"],
                "first_error": row["first_error"],
                "redrive_attempts": row["redrive_attempts"],
                "updated_at": row["updated_at"].isoformat(),
                "resolved_at": row["resolved_at"].isoformat() if row["resolved_at"] else None,
                "headers": [
                    {"name": name, "value": _bytes(value)}
                    for name, value in zip(row["header_names"], row["header_values"], strict=True)
                ],
                "traceback": row["traceback"],
            }
        )
    return data
