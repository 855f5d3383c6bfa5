"""Browser authentication: per-name tokens from a token file, compared in constant time.

Browsers cannot hold a CURVE key, so with ``masa-rt web --token-file FILE`` each browser
(operator, headset) proves itself to the gateway with a token of its own, and the gateway
speaks to the server with its own CURVE key. One line per holder, as the key allow-list
has one file per client::

    # NAME TOKEN           (blank lines and '#' comments ignored)
    operator  Zk3...(at least 16 characters)
    headset1  p9Q...

Make a token with ``python -c "import secrets; print(secrets.token_urlsafe(32))"``. The
file must be readable by its owner only (0600), as secret keys are. Removing a line
revokes that token for new connections; the file is re-read when it changes.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MIN_TOKEN_CHARS = 16


class TokenFileError(ValueError):
    """A token file that cannot be used (missing, loose permissions, a bad line)."""


def parse_tokens(text: str, source: str = "token file") -> dict[str, bytes]:
    """NAME -> token bytes from the file's text; a bad line is a one-line error naming it."""
    tokens: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not NAME.fullmatch(parts[0]):
            raise TokenFileError(f"{source}:{number}: expected 'NAME TOKEN' "
                                 "(NAME: 1-64 of [A-Za-z0-9._-])")
        name, token = parts
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{source}:{number}: token of {name} is shorter than "
                                 f"{MIN_TOKEN_CHARS} characters")
        if name in tokens:
            raise TokenFileError(f"{source}:{number}: {name} is listed twice")
        tokens[name] = token.encode()
    if not tokens:
        raise TokenFileError(f"{source}: no tokens (lines 'NAME TOKEN')")
    return tokens


class TokenFile:
    """The allow-list of browser tokens, re-read when the file changes (revocation)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, bytes] = {}
        self._reload()  # a bad file fails at start, not at the first browser

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise TokenFileError(f"token file {self.path} not found") from None
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError(f"token file {self.path} is readable by others: "
                                 f"chmod 600 {self.path}")
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._tokens = parse_tokens(self.path.read_text(), str(self.path))
            self._stamp = stamp

    def check(self, token: object) -> str | None:
        """The name holding ``token``, or None. Every listed token is compared, each with
        ``hmac.compare_digest``, so the time taken says nothing about how close it was."""
        try:
            self._reload()
        except (TokenFileError, OSError):
            return None  # a broken or loosened file admits nobody until it is fixed
        if not isinstance(token, str):
            return None
        given = token.encode()
        found = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(given, expected) and found is None:
                found = name
        return found
