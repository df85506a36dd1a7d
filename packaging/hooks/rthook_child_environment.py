"""Runtime hook: programs this bundle starts (nft, ip, xdg-open) get the system's libraries.

PyInstaller's bootloader points LD_LIBRARY_PATH at the bundle so the frozen interpreter
finds its own copies; the dynamic loader reads it once at start, so putting the caller's
value back now changes nothing for this process, only for its children.
"""

import os

_original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
if _original is not None:
    os.environ["LD_LIBRARY_PATH"] = _original
else:
    os.environ.pop("LD_LIBRARY_PATH", None)
