"""Where the pairing token is kept: the user's keyring, or a file only the user can read.

The token is the one secret of a pairing: whoever has it may use the server. It goes into
the desktop keyring (Secret Service, KWallet...) through the ``keyring`` library, under
service "braid" and the server's "host:port". Where no keyring works (a bare window
manager, a headless session) it goes to $XDG_CONFIG_HOME/braid/tokens.json with mode
0600, and the tray says so in plain words.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from braid.gui.preferences import config_dir

log = logging.getLogger(__name__)

SERVICE = "braid"
TOKENS_FILE = "tokens.json"


def _keyring():
    """The keyring module, or None where it is not installed."""
    try:
        import keyring
    except ImportError:
        return None
    return keyring


class TokenStore:
    """Saves and reads tokens; ``where`` tells the user where the last one went."""

    def __init__(self, fallback: Path | None = None) -> None:
        self._fallback = fallback
        self.where = ""

    @property
    def fallback_path(self) -> Path:
        return self._fallback or config_dir() / TOKENS_FILE

    def backend_name(self) -> str | None:
        """The keyring backend's name, or None when no usable backend exists."""
        keyring = _keyring()
        if keyring is None:
            return None
        try:
            backend = keyring.get_keyring()
        except Exception:  # a broken backend configuration is "no keyring" to the user
            return None
        if backend.priority <= 0 or type(backend).__module__.startswith("keyring.backends.fail"):
            return None
        return getattr(backend, "name", type(backend).__name__)

    def save(self, server: str, token: str) -> str:
        """Keep ``token`` for ``server``; returns a sentence saying where it is."""
        keyring = _keyring()
        name = self.backend_name()
        if keyring is not None and name is not None:
            try:
                keyring.set_password(SERVICE, server, token)
            except Exception as exc:  # locked, dismissed prompt, D-Bus gone...
                log.warning("the keyring refused the token: %s", exc)
                reason = f"the keyring ({name}) refused it: {exc}"
            else:
                self._forget_file(server)
                self.where = f"The token is in your keyring ({name})."
                return self.where
        else:
            reason = "no keyring is available (no Secret Service or KWallet is running)"
        self._save_file(server, token)
        self.where = (
            f"Stored in {self.fallback_path}, readable only by you: {reason}. "
            "Start your desktop's keyring to keep it there instead."
        )
        return self.where

    def load(self, server: str) -> str | None:
        keyring = _keyring()
        if keyring is not None and self.backend_name() is not None:
            try:
                token = keyring.get_password(SERVICE, server)
            except Exception as exc:
                log.warning("could not read the keyring: %s", exc)
                token = None
            if token:
                return token
        return self._read_file().get(server)

    # -- the file fallback ------------------------------------------------------

    def _read_file(self) -> dict[str, str]:
        try:
            data = json.loads(self.fallback_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_file(self, tokens: dict[str, str]) -> None:
        path = self.fallback_path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(tokens, out)
        os.chmod(tmp, 0o600)  # an old file left with wider rights is narrowed too
        os.replace(tmp, path)

    def _save_file(self, server: str, token: str) -> None:
        tokens = self._read_file()
        tokens[server] = token
        self._write_file(tokens)

    def _forget_file(self, server: str) -> None:
        tokens = self._read_file()
        if tokens.pop(server, None) is not None:
            with contextlib.suppress(OSError):
                self._write_file(tokens)
