"""``python -m tests.chaos``: one seeded chaos run outside pytest, with its table on stdout.

Servers come from the same variables as the test suite:
``CONSUMER_TEST_KAFKA_BOOTSTRAP`` (else an embedded Tansu broker is started)
and ``CONSUMER_TEST_DATABASE_URL`` (else postgres@127.0.0.1:5432, else an
embedded PostgreSQL). The run creates its own database and topic. Exit code
0 means no violation, 1 at least one, 2 a run that could not be carried out.
When a violation is found, the database is kept for inspection and its URL
printed beside the log folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

from consumer import embedded
from consumer.errors import ConsumerError
from tests.chaos import driver
from tests.chaos.checker import Report
from tests.support import db, kafka
from tests.support.waiting import run_blocking

KAFKA_BOOTSTRAP_VAR = "CONSUMER_TEST_KAFKA_BOOTSTRAP"
DATABASE_URL_VAR = "CONSUMER_TEST_DATABASE_URL"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7, help="Seed of the stream and of the faults (default 7).")
    parser.add_argument("--duration", type=float, default=120.0, help="Fault window in seconds (default 120).")
    parser.add_argument(
        "--messages", type=int, help="Logical messages to publish (default 25 per second of the window)."
    )
    parser.add_argument("--workers", type=int, default=3, help="Base workers in the group (default 3).")
    parser.add_argument(
        "--fault-interval", type=float, default=2.0, help="Mean time between process faults, in seconds (default 2)."
    )
    parser.add_argument(
        "--replays", type=int, default=1, help="Replays to earliest, evenly spaced in the window (default 1)."
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=300.0, help="Time allowed to drain after the window, in seconds."
    )
    parser.add_argument(
        "--log-dir", type=Path, help="Folder of worker logs and the report (default a new temp folder)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = driver.ChaosConfig(
        seed=args.seed,
        duration_s=args.duration,
        messages=args.messages or int(args.duration * 25),
        workers=args.workers,
        mean_fault_interval_s=args.fault_interval,
        replays=args.replays,
        drain_timeout_s=args.drain_timeout,
    )
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"chaos-{args.seed}-"))
    print(f"chaos run: seed {config.seed}, {config.duration_s:.0f}s window, logs in {log_dir}", flush=True)
    try:
        with _broker() as bootstrap, _postgres(log_dir) as admin_dsn:
            report = _run(config, bootstrap, admin_dsn, log_dir)
    except (AssertionError, OSError, ConsumerError) as exc:
        print(f"chaos run failed before its checks: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    return 1 if report.violations else 0


def _run(config: driver.ChaosConfig, bootstrap: str, admin_dsn: str, log_dir: Path) -> Report:
    name = db.unique_database_name("consumer_chaos_")
    database_url = run_blocking(lambda: db.create_database(admin_dsn, name))
    topic = kafka.unique_topic_name(f"chaos-{config.seed}")
    run_blocking(lambda: embedded.create_topic(bootstrap, topic, config.partitions))
    report: Report | None = None
    try:
        report = anyio.run(_run_async, config, bootstrap, database_url, topic, log_dir)
    finally:
        run_blocking(lambda: kafka.delete_topics(bootstrap, [topic]))
        if report is not None and report.violations:
            print(f"database kept for inspection: {database_url}")
        else:
            run_blocking(lambda: db.drop_database(admin_dsn, name))
    assert report is not None
    return report


async def _run_async(
    config: driver.ChaosConfig, bootstrap: str, database_url: str, topic: str, log_dir: Path
) -> Report:
    return await driver.run(config, bootstrap=bootstrap, database_url=database_url, topic=topic, log_dir=log_dir)


@contextlib.contextmanager
def _broker() -> Iterator[str]:
    configured = os.environ.get(KAFKA_BOOTSTRAP_VAR)
    if configured:
        yield configured
        return
    with embedded.start_broker() as broker:
        yield broker.bootstrap_servers


@contextlib.contextmanager
def _postgres(log_dir: Path) -> Iterator[str]:
    configured = os.environ.get(DATABASE_URL_VAR)
    if configured:
        yield configured
        return
    if run_blocking(lambda: db.is_reachable(db.LOCAL_ADMIN_DSN)):
        yield db.LOCAL_ADMIN_DSN
        return
    with embedded.start_postgres(log_dir / f"postgres-{int(time.time())}") as server:
        yield server.dsn


if __name__ == "__main__":
    sys.exit(main())
