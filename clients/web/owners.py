"""Session ownership per browser identity, which the server cannot see through the gateway.

With ``--secure`` the server binds each session to the CURVE key that opened it
(docs/protocol.md, "Sessions", rule 8), but every page reaches it under the gateway's one
key. So the gateway applies the same rule one level up, to token names: a session belongs
to the name whose page sent its ``hello``; another name's message for it is refused with
``session_owner``, and one name holds at most ``max_per_client`` sessions
(``too_many_sessions``). Without tokens there is no identity, as in the server's plain
mode, and nothing is checked.

A page that closes keeps its sessions for ``hold_s`` (its reload or reconnect resumes
them); after that the server has expired them too and the ids are free again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Claim:
    owner: str
    expires: float | None = None  # None: a live page holds it


class SessionOwners:
    def __init__(self, hold_s: float = 30.0, max_per_client: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s, self.max_per_client, self._clock = hold_s, max_per_client, clock
        self._claims: dict[str, _Claim] = {}

    def _live(self, session: str) -> _Claim | None:
        claim = self._claims.get(session)
        if claim is not None and claim.expires is not None and claim.expires < self._clock():
            del self._claims[session]
            return None
        return claim

    def check(self, session: str, owner: str | None) -> str | None:
        """None if ``owner`` may use ``session``, else the protocol reason to refuse."""
        if owner is None:
            return None
        claim = self._live(session)
        return None if claim is None or claim.owner == owner else "session_owner"

    def claim(self, session: str, owner: str | None) -> str | None:
        """A ``hello``: take (or keep) the session; the refusal reason, or None."""
        if owner is None:
            return None
        refused = self.check(session, owner)
        if refused:
            return refused
        if session not in self._claims and self.held_by(owner) >= self.max_per_client:
            return "too_many_sessions"
        self._claims[session] = _Claim(owner)
        return None

    def release(self, session: str, owner: str | None) -> None:
        """A ``bye``: the session is gone, its id free."""
        if owner is not None and self.check(session, owner) is None:
            self._claims.pop(session, None)

    def hold(self, sessions: set[str], owner: str | None) -> None:
        """The page that opened ``sessions`` closed: keep them ``hold_s`` for its return."""
        expires = self._clock() + self.hold_s
        for session in sessions:
            claim = self._live(session)
            if claim is not None and claim.owner == owner:
                claim.expires = expires

    def held_by(self, owner: str) -> int:
        return sum(1 for s in list(self._claims) if (c := self._live(s)) and c.owner == owner)
