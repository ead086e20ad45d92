"""Time and statement profile of the framework modes: ``python -m benchmarks.profile --mode framework_batch``.

Drains the main topic once with each reference loop and once with each
chosen mode. For each run it prints the statements sent to PostgreSQL per
batch, counted in the client, and the CPU time per message of this
process, of the database's backends and of the broker. With
``--cprofile`` it also prints the functions of this process that took the
most CPU time.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import itertools
import pstats
import resource
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from benchmarks import drains, framework, stream
from benchmarks.database import BenchDatabase
from benchmarks.run import FRAMEWORK_MODES
from consumer import embedded

_COUNTED_METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval")
_CLOCK_TICKS = 100
# Backends are sampled this often, in seconds; CPU time after the last sample is missed.
_SAMPLE_S = 0.1
# Samples between two scans of /proc for new backends; a scan costs a few milliseconds.
_RESCAN_EVERY = 10


@contextmanager
def count_statements() -> Iterator[collections.Counter[str]]:
    """Count the statements every asyncpg connection of this process sends, by their first line."""
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(asyncpg.Connection, name) for name in _COUNTED_METHODS}

    def counting(name: str) -> Callable[..., Any]:
        original = originals[name]

        async def call(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
            lines = [line.strip() for line in query.strip().splitlines() if not line.strip().startswith("--")]
            counts[f"{name}: {lines[0][:70] if lines else query[:70]}"] += 1
            return await original(self, query, *args, **kwargs)

        return call

    for name in _COUNTED_METHODS:
        setattr(asyncpg.Connection, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(asyncpg.Connection, name, original)


def _cpu_seconds(pids: list[int]) -> float:
    """Return user plus system CPU seconds of `pids`, skipping those that exited."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def _backend_pids(database: str) -> list[int]:
    """Return the PIDs of PostgreSQL backends connected to `database`, from their process titles."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and f" {database} " in title:
            pids.append(int(entry.name))
    return pids


async def measure(
    name: str,
    run: Callable[[], Awaitable[Any]],
    database: BenchDatabase,
    broker_pid: int,
    *,
    profile: bool,
    dump_dir: Path | None = None,
) -> str:
    """Run `run` once and return a report of its statements and CPU time per message."""
    await database.reset()
    profiler = cProfile.Profile() if profile else None
    before_self = resource.getrusage(resource.RUSAGE_SELF)
    before_broker = _cpu_seconds([broker_pid])
    with count_statements() as counts:
        if profiler is not None:
            profiler.enable()
        # CPU seconds of each backend at its last sample: a backend's
        # /proc entry is gone once the run closes its connection.
        backend_cpu: dict[int, float] = {}

        async def sample_backends() -> None:
            known: list[int] = []
            for sample in itertools.count():
                if sample % _RESCAN_EVERY == 0:
                    known = sorted(set(known) | set(_backend_pids(database.name)))
                for pid in known:
                    backend_cpu[pid] = max(backend_cpu.get(pid, 0.0), _cpu_seconds([pid]))
                await anyio.sleep(_SAMPLE_S)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(sample_backends)
            result = await run()
            task_group.cancel_scope.cancel()
        if profiler is not None:
            profiler.disable()
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    messages = result.messages
    own_cpu = (after_self.ru_utime + after_self.ru_stime) - (before_self.ru_utime + before_self.ru_stime)
    batches = getattr(result, "batches", None) or max(len(getattr(result, "commits", [])), 1)
    lines = [
        f"## {name}: {result.rate:,.0f} msg/s over {result.seconds:.2f}s, {batches} batches",
        "",
        f"CPU per message: this process {own_cpu / messages * 1e6:.1f} us, "
        f"PostgreSQL backends {sum(backend_cpu.values()) / messages * 1e6:.1f} us, "
        f"broker {(_cpu_seconds([broker_pid]) - before_broker) / messages * 1e6:.1f} us",
        "",
        "| statement | calls | per batch |",
        "|---|---|---|",
    ]
    for statement, calls in counts.most_common(15):
        lines.append(f"| `{statement}` | {calls} | {calls / batches:.2f} |")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        if dump_dir is not None:
            profiler.dump_stats(dump_dir / f"{name}.prof")
        lines += ["", "```", text.getvalue().strip(), "```"]
    return "\n".join(lines)


def _worker_runner(
    make_handler: Callable[[], Any], bootstrap: str, database_url: str, topic: stream.Topic
) -> Callable[[], Awaitable[framework.FrameworkRun]]:
    return lambda: framework.run_worker(make_handler(), bootstrap, database_url, topic)


async def main(args: argparse.Namespace) -> None:
    modes = {name: make_handler for name, make_handler, _ in FRAMEWORK_MODES}
    broker = embedded.start_broker()
    database = BenchDatabase(args.database_url)
    await database.create()
    try:
        bootstrap = broker.bootstrap_servers
        name = "profile-main"
        await embedded.create_topic(bootstrap, name, args.partitions)
        messages = stream.main_stream(args.messages, args.partitions, args.duplicates, args.seed)
        topic = await stream.produce(bootstrap, name, args.partitions, messages)
        runs: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("baseline", lambda: drains.baseline(bootstrap, database.url, topic)),
            ("baseline_per_message", lambda: drains.baseline(bootstrap, database.url, topic, executemany=False)),
        ]
        for mode in args.mode:
            runs.append((mode, _worker_runner(modes[mode], bootstrap, database.url, topic)))
        for run_name, run in runs:
            report = await measure(
                run_name, run, database, broker.pid, profile=args.cprofile, dump_dir=args.cprofile_dir
            )
            print(report, flush=True)
            print(flush=True)
    finally:
        await database.drop()
        broker.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument(
        "--mode",
        action="append",
        choices=[name for name, _, _ in FRAMEWORK_MODES],
        help="Framework mode to profile; repeatable (default: all).",
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cprofile", action="store_true", help="Also print the top functions by own CPU time.")
    parser.add_argument(
        "--cprofile-dir", type=Path, help="Also write each run's profile there as NAME.prof, for pstats or snakeviz."
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    args.mode = args.mode or [name for name, _, _ in FRAMEWORK_MODES]
    if args.cprofile_dir is not None:
        args.cprofile_dir.mkdir(parents=True, exist_ok=True)
    anyio.run(main, args, backend="asyncio")


if __name__ == "__main__":
    cli()
