"""``consumer replay`` and ``consumer prune``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio

from consumer import db, errors, replay, retention, settings
from consumer.handler import load_handler

__all__ = ["add_parsers", "run_prune", "run_replay"]


def add_parsers(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``replay`` and ``prune`` on `commands`."""
    parser = commands.add_parser(
        "replay",
        help="Move a group's position (running workers follow), count first with --dry-run, or reprocess a range.",
    )
    parser.add_argument("handler", help="Handler class as module:ClassName; gives the group, keys and decoding.")
    parser.add_argument("--topic", required=True, help="Topic to replay.")
    parser.add_argument("--partition", type=int, action="append", help="Partition; repeatable (default all).")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--to-offset", type=int, metavar="OFFSET", help="Move to this offset.")
    target.add_argument(
        "--to-timestamp", type=_timestamp, metavar="TIME", help="Move to the first offset at this time."
    )
    target.add_argument("--to-earliest", action="store_true", help="Move to the log start.")
    target.add_argument("--to-end", action="store_true", help="Move to the log end, skipping the backlog.")
    parser.add_argument("--dry-run", action="store_true", help="Only report what would apply, skip or be missing.")
    parser.add_argument(
        "--reprocess",
        action="store_true",
        help="Apply [--from-offset, --until-offset) of one --partition again, clearing its dedup records.",
    )
    parser.add_argument("--from-offset", type=int, help="First offset to reprocess.")
    parser.add_argument("--until-offset", type=int, help="Offset after the last one to reprocess.")
    parser.add_argument("--force", action="store_true", help="Replay past the dedup horizon anyway.")
    parser.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    add_common(parser)

    prune = commands.add_parser("prune", help="Delete dedup records older than the retention horizon.")
    prune.add_argument("--group", help="Dedup scope to prune (default every scope with a position).")
    prune.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="Horizon in seconds [default: CONSUMER_WORKER__INBOX_RETENTION_S].",
    )
    prune.add_argument("--dry-run", action="store_true", help="Only count the expired records.")
    add_common(prune)


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time such as 2026-12-01T00:00Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or +HH:MM")
    return value


def _target(args: argparse.Namespace) -> replay.Target:
    if args.to_offset is not None:
        if args.to_offset < 0:
            raise errors.ConfigurationError(f"--to-offset {args.to_offset} is invalid; offsets start at 0")
        return replay.Target("offset", offset=args.to_offset)
    if args.to_timestamp is not None:
        return replay.Target("timestamp", timestamp=args.to_timestamp)
    if args.to_earliest:
        return replay.Target("earliest")
    if args.to_end:
        return replay.Target("end")
    raise errors.ConfigurationError("choose where to move: --to-offset, --to-timestamp, --to-earliest or --to-end")


def run_replay(args: argparse.Namespace, config: settings.Settings) -> int:
    result: int = anyio.run(_replay, args, config, backend="asyncio")
    return result


async def _replay(args: argparse.Namespace, config: settings.Settings) -> int:
    handler = load_handler(args.handler)()
    group_id = config.kafka.group_id or handler.group_id
    dedup_scope = config.dedup_scope or handler.dedup_scope or group_id
    if args.reprocess:
        return await _reprocess(args, config, handler, dedup_scope)
    target = _target(args)
    connection = await db.connect(config.postgres)
    queries = db.load_queries("replay.sql", config.postgres.schema_name)
    try:
        plans = await replay.plan(
            config,
            connection,
            queries,
            handler,
            dedup_scope=dedup_scope,
            topic=args.topic,
            partitions=args.partition,
            target=target,
        )
        _print_plans(args, plans, dry_run=args.dry_run)
        if args.dry_run:
            return 0
        _check_horizon(args, config, plans)
        if not args.yes and not _confirm(f"move {len(plans)} partition(s) of {args.topic} for scope {dedup_scope}?"):
            print("nothing changed")
            return 1
        await replay.apply_moves(
            connection, queries, dedup_scope=dedup_scope, group_id=group_id, topic=args.topic, plans=plans
        )
    finally:
        await connection.close()
    print("positions moved; running workers follow after their in-flight batch")
    return 0


async def _reprocess(args: argparse.Namespace, config: settings.Settings, handler: Any, dedup_scope: str) -> int:
    if args.partition is None or len(args.partition) != 1 or args.from_offset is None or args.until_offset is None:
        raise errors.ConfigurationError(
            "--reprocess needs exactly one --partition, --from-offset and --until-offset: it re-applies only that range"
        )
    if not 0 <= args.from_offset < args.until_offset:
        raise errors.ConfigurationError(
            f"--from-offset {args.from_offset} must be at least 0 and below --until-offset {args.until_offset}"
        )
    partition = args.partition[0]
    connection = await db.connect(config.postgres)
    queries = db.load_queries("replay.sql", config.postgres.schema_name)
    try:
        plans = await replay.plan(
            config,
            connection,
            queries,
            handler,
            dedup_scope=dedup_scope,
            topic=args.topic,
            partitions=[partition],
            target=replay.Target("offset", offset=args.from_offset),
            reprocess_range=(args.from_offset, args.until_offset),
        )
        _print_plans(args, plans, dry_run=True)
        if args.dry_run:
            return 0
        _check_horizon(args, config, plans)
        question = (
            f"apply {args.topic}-{partition} offsets {args.from_offset} to {args.until_offset - 1} again "
            f"({plans[0].would_apply} messages would apply)?"
        )
        if not args.yes and not _confirm(question):
            print("nothing changed")
            return 1
        cleared = await replay.reprocess(
            connection,
            queries,
            dedup_scope=dedup_scope,
            topic=args.topic,
            partition=partition,
            start=args.from_offset,
            until=args.until_offset,
        )
    finally:
        await connection.close()
    print(f"cleared {cleared} dedup records; running workers apply the range after their in-flight batch")
    return 0


def _check_horizon(args: argparse.Namespace, config: settings.Settings, plans: list[replay.PartitionPlan]) -> None:
    horizon_ms = (time.time() - config.worker.inbox_retention_s) * 1000
    oldest = [p.oldest_timestamp_ms for p in plans if p.oldest_timestamp_ms is not None]
    if oldest and min(oldest) < horizon_ms and not args.force:
        raise errors.ConfigurationError(
            "the replay reaches messages older than the dedup horizon "
            f"({config.worker.inbox_retention_s / 86_400:.1f} days): keyed messages whose dedup records were "
            "pruned may apply again; check --dry-run, then pass --force"
        )


def _print_plans(args: argparse.Namespace, plans: list[replay.PartitionPlan], *, dry_run: bool) -> None:
    if args.json:
        print(json.dumps({"dry_run": dry_run, "partitions": [p.as_dict() for p in plans]}, indent=2))
        return
    print(
        f"{'PART':>4} {'CURRENT':>9} {'TARGET':>9} {'END':>9} {'NEW':>7} {'POS-DUP':>7} {'KEY-DUP':>7} "
        f"{'CONFLICT':>8} {'DLQ':>5} {'GONE':>6} {'SKIPPED':>7}"
    )
    for p in plans:
        current = "-" if p.current is None else str(p.current)
        print(
            f"{p.partition:>4} {current:>9} {p.target:>9} {p.end:>9} {p.would_apply:>7} {p.position_duplicates:>7} "
            f"{p.key_duplicates:>7} {p.conflicts:>8} {p.would_dead_letter:>5} {p.not_retained:>6} "
            f"{p.skipped_forward:>7}"
        )
    print(
        "NEW would apply for the first time; POS-DUP were applied at that offset; KEY-DUP have a key applied "
        "elsewhere; GONE are no longer retained; SKIPPED lie between the current position and a forward target."
    )


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise errors.ConfigurationError(f"{question} needs a confirmation; pass --yes when not on a terminal")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def run_prune(args: argparse.Namespace, config: settings.Settings) -> int:
    result: int = anyio.run(_prune, args, config, backend="asyncio")
    return result


async def _prune(args: argparse.Namespace, config: settings.Settings) -> int:
    horizon_s = args.older_than if args.older_than is not None else config.worker.inbox_retention_s
    connection = await db.connect(config.postgres)
    queries = db.load_queries("replay.sql", config.postgres.schema_name)
    side_queries = db.load_queries("side_effects.sql", config.postgres.schema_name)
    try:
        scopes = [args.group] if args.group else [row[0] for row in await connection.fetch(queries.scopes)]
        for scope in scopes:
            if args.dry_run:
                count = await connection.fetchval(queries.count_expired, scope, horizon_s)
                print(f"{scope}: {count} dedup records older than {horizon_s:.0f}s")
                continue
            deleted = await retention.prune(
                connection, queries, scope, retention_s=horizon_s, batch_size=config.worker.prune_batch_size
            )
            side = await retention.prune_side_effects(
                connection, side_queries, scope, retention_s=horizon_s, batch_size=config.worker.prune_batch_size
            )
            print(
                f"{scope}: deleted {deleted} dedup records and {side} step results or sent outbox rows "
                f"older than {horizon_s:.0f}s"
            )
    finally:
        await connection.close()
    return 0
