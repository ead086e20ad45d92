"""``python -m consumer``: the same as the ``consumer`` command."""

import sys

from consumer.cli import main

sys.exit(main())
