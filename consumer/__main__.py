"""``python -m consumer`` and the ``consumer`` command."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _stopped_before_start(signum: int, frame: FrameType | None) -> None:
    # SIGTERM while the interpreter is still importing: nothing was fetched
    # or applied yet, so this is a clean stop. The worker replaces this
    # handler with its graceful one before it joins the group.
    raise SystemExit(0)


def run() -> None:
    """Run the CLI, treating a SIGTERM during start-up as a clean stop."""
    signal.signal(signal.SIGTERM, _stopped_before_start)
    from consumer.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
