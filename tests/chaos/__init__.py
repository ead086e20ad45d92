"""Chaos tests: real workers under injected faults, then a check of every effect.

- `stream`: the seeded messages, producer duplicates and handler faults;
- `handler`: the handler the workers run, with its fault hooks;
- `cluster`: the worker processes and their signals;
- `faults`: the seeded fault injector;
- `driver`: one run from migration to drain;
- `checker`: the checks and the result table.

``python -m tests.chaos --seed 7 --duration 120`` runs one scenario on its
own; docs/chaos.md describes both runs and their results.
"""
