"""Client exceptions. A timeout is not an error (pulls return None); these are."""

from __future__ import annotations


class MasaClientError(Exception):
    """Base class for everything the client library raises on purpose."""

    user_facing = True  # the masa-rt CLI prints these as one line (masa_rt.cli)


class ConnectionLost(MasaClientError):
    """The server did not answer within the deadline (not started, gone, or unreachable)."""


class ServerError(MasaClientError):
    """The server refused the session; ``reason`` is a protocol error reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"server refused: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail
