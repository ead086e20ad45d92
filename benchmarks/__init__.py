"""Throughput, latency and memory benchmarks of the worker, run as ``python -m benchmarks.run``.

The suite starts its own Tansu broker (``consumer.embedded.start_broker``)
and creates a throwaway database on a PostgreSQL server given by URL, so
every measured system runs on one machine against the same topic and the
same database. It is not part of the pytest run: numbers depend on the
machine, and only ratios measured in one run compare. ``python -m
benchmarks.profile`` shows where a framework mode spends its time.
docs/benchmarks.md has the method, the results and how to reproduce them.
"""
