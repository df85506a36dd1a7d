"""Entry point of the frozen ``braid`` command (and ``braid daemon``)."""

import sys

from braid.cli import main

sys.exit(main())
