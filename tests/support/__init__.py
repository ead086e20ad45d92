"""Helpers shared by the test suite, imported as ``tests.support.<module>``.

- `kafka`: produce records, consume them back, read committed offsets.
- `db`: create and drop throwaway PostgreSQL databases.
- `waiting`: poll until a condition holds, and run a coroutine from sync code.
- `process`: run ``python -m consumer`` as a subprocess and send it signals.
"""
