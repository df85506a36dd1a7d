"""Entry point of the frozen ``braid-server`` command."""

import sys

from braid.server.cli import main

sys.exit(main())
