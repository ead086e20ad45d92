"""Medians, ratios and the Markdown tables of a benchmark run."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.stream import Topic

__all__ = [
    "keys_summary",
    "latency_summary",
    "markdown",
    "memory_summary",
    "scale_out_summary",
    "throughput_summary",
    "update_docs",
]

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# The generated tables of a run go between these two lines of the docs page.
START_MARKER = "<!-- generated tables: start -->"
END_MARKER = "<!-- generated tables: end -->"

# Share of the baseline each framework mode should reach, as set for this
# suite. A batch handler should reach 0.9 with positional dedup and 0.75 with
# a business key, and a per-message handler 0.6 in either dedup mode.
PER_MESSAGE_TARGET = 0.6
TARGETS = {
    "framework_positional": ("baseline", PER_MESSAGE_TARGET),
    "framework_batch": ("baseline", 0.9),
    "framework_keyed": ("baseline", PER_MESSAGE_TARGET),
    "framework_batch_keyed": ("baseline", 0.75),
    "framework_deferred": ("baseline", PER_MESSAGE_TARGET),
    "framework_deferred_keyed": ("baseline", PER_MESSAGE_TARGET),
}


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(run[field] for run in runs))


def throughput_summary(
    runs: dict[str, list[dict[str, Any]]], descriptions: dict[str, str], topic: Topic
) -> dict[str, Any]:
    medians = {name: _median(system_runs, "rate") for name, system_runs in runs.items()}
    ceiling = medians.get("raw_drain")
    baseline = medians.get("baseline")
    per_message = medians.get("baseline_per_message")
    systems = {}
    for name, system_runs in runs.items():
        rate = medians[name]
        systems[name] = {
            "description": descriptions.get(name, name),
            "median_rate": round(rate),
            "ratio_to_ceiling": round(rate / ceiling, 3) if ceiling else None,
            "ratio_to_baseline": round(rate / baseline, 3) if baseline else None,
            "ratio_to_baseline_per_message": round(rate / per_message, 3) if per_message else None,
            "runs": system_runs,
        }
    return {
        "topic": {"messages": topic.messages, "partitions": topic.partitions, "end_offsets": topic.end_offsets},
        "systems": systems,
    }


def keys_summary(runs: dict[str, list[dict[str, Any]]], topics: dict[int, Topic], sleep_s: float) -> dict[str, Any]:
    rows = {}
    for name, system_runs in runs.items():
        ordering, keys = name.split("/")
        topic = topics[int(keys)]
        rows[name] = {
            "ordering": ordering,
            "distinct_keys": int(keys),
            "partitions_used": len(topic.end_offsets),
            # With one handler call at a time per partition, the largest partition sets the drain time.
            "largest_partition": max(topic.end_offsets.values()),
            "median_rate": round(_median(system_runs, "rate"), 1),
            "runs": system_runs,
        }
    return {"handler_sleep_s": sleep_s, "messages": next(iter(topics.values())).messages, "runs": rows}


def latency_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        name: {
            "offered_rate": system_runs[0]["offered_rate"],
            "messages": system_runs[0]["messages"],
            "p50_ms": _median(system_runs, "p50_ms"),
            "p99_ms": _median(system_runs, "p99_ms"),
            "max_ms": _median(system_runs, "max_ms"),
            "runs": system_runs,
        }
        for name, system_runs in runs.items()
    }


def memory_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        name: {
            "messages": int(name.split("/")[1]),
            "peak_rss_mib": _median(system_runs, "peak_rss_mib"),
            "median_rate": round(_median(system_runs, "rate")),
            "all_finished": all(run["finished"] for run in system_runs),
            "runs": system_runs,
        }
        for name, system_runs in runs.items()
    }


def scale_out_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    one = runs.get("workers/1")
    single = _median(one, "rate") if one else None
    return {
        name: {
            "workers": int(name.split("/")[1]),
            "median_rate": round(_median(system_runs, "rate")),
            "speedup": round(_median(system_runs, "rate") / single, 2) if single else None,
            "median_settle_s": _median(system_runs, "settle_s"),
            "runs": system_runs,
        }
        for name, system_runs in runs.items()
    }


def markdown(results: dict[str, Any]) -> str:
    """Return the tables of `results` as Markdown."""
    parts = [f"Command: `{results['command'].strip()}`", ""]
    if "throughput" in results:
        parts += _throughput_table(results["throughput"])
    if "keys" in results:
        parts += _keys_table(results["keys"])
    if "latency" in results:
        parts += _table(
            ["system", "offered msg/s", "messages", "p50 ms", "p99 ms", "max ms"],
            [
                [
                    name,
                    f"{row['offered_rate']:,.0f}",
                    f"{row['messages']:,}",
                    row["p50_ms"],
                    row["p99_ms"],
                    row["max_ms"],
                ]
                for name, row in results["latency"].items()
            ],
        )
    if "memory" in results:
        parts += _table(
            ["backlog (messages)", "peak RSS MiB (median)", "per run", "msg/s", "drained"],
            [
                [
                    f"{row['messages']:,}",
                    row["peak_rss_mib"],
                    ", ".join(str(run["peak_rss_mib"]) for run in row["runs"]),
                    f"{row['median_rate']:,}",
                    "yes" if row["all_finished"] else "no (time bound)",
                ]
                for row in results["memory"].values()
            ],
        )
    if "scaleout" in results:
        parts += _table(
            ["worker processes", "msg/s (median)", "speed-up", "settle s", "per run msg/s"],
            [
                [
                    row["workers"],
                    f"{row['median_rate']:,}",
                    row["speedup"],
                    row["median_settle_s"],
                    ", ".join(f"{run['rate']:,}" for run in row["runs"]),
                ]
                for row in results["scaleout"].values()
            ],
        )
    return "\n".join(parts)


def _throughput_table(summary: dict[str, Any]) -> list[str]:
    rows = []
    for name, row in summary["systems"].items():
        target = TARGETS.get(name)
        rows.append(
            [
                name,
                row["description"],
                f"{row['median_rate']:,}",
                ", ".join(f"{run['rate']:,}" for run in row["runs"]),
                row["ratio_to_ceiling"],
                row["ratio_to_baseline"],
                row["ratio_to_baseline_per_message"],
                f">= {target[1]}" if target else "",
            ]
        )
    headers = ["system", "what", "msg/s (median)", "per run", "x ceiling", "x baseline", "x baseline per message"]
    headers.append("target x baseline")
    return _table(headers, rows)


def _keys_table(summary: dict[str, Any]) -> list[str]:
    rows = [
        [
            row["ordering"],
            row["distinct_keys"],
            row["partitions_used"],
            row["largest_partition"],
            f"{row['median_rate']:,}",
            ", ".join(f"{run['rate']:,}" for run in row["runs"]),
        ]
        for row in summary["runs"].values()
    ]
    headers = ["ordering", "distinct keys", "partitions used", "largest partition", "msg/s (median)", "per run"]
    return _table(headers, rows)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def update_docs(results: dict[str, Any], results_path: Path, page: Path = DOCS_PAGE) -> None:
    """Replace the generated section of `page` with the machine, command and tables of `results`."""
    text = page.read_text()
    if START_MARKER not in text or END_MARKER not in text:
        raise SystemExit(f"{page} has no section between {START_MARKER!r} and {END_MARKER!r}; add the two lines")
    machine = results.get("machine", {})
    lines = [
        START_MARKER,
        "",
        f"Generated from `{results_path.name}` of {results.get('date', 'an unknown date')} by "
        f"`python -m benchmarks.report {results_path.name}`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in machine.items()),
        "",
        markdown(results).rstrip(),
        "",
        END_MARKER,
    ]
    before = text[: text.index(START_MARKER)]
    after = text[text.index(END_MARKER) + len(END_MARKER) :]
    page.write_text(before + "\n".join(lines) + after)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Write the tables of a results file into the generated section of docs/benchmarks.md.",
    )
    parser.add_argument("results", type=Path, help="A results file, such as benchmarks/results/2026-12-05.json.")
    args = parser.parse_args(argv)
    path = args.results if args.results.exists() else Path(__file__).resolve().parent / "results" / args.results
    update_docs(json.loads(path.read_text()), path)
    print(f"updated {DOCS_PAGE}")


if __name__ == "__main__":
    cli()
