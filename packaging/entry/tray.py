"""Entry point of the frozen tray application ``braid-tray``."""

import sys

from braid.gui.app import main

sys.exit(main())
