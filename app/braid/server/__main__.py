"""``python -m braid.server``: the same as the braid-server command."""

import sys

from braid.server.cli import main

sys.exit(main())
