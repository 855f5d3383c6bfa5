"""``GatewayConfig``: where the gateway listens, which server it speaks to, its limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clients.inlet import DEFAULT_PUB_ADDRESS
from clients.outlet import DEFAULT_ADDRESS
from masa_rt.protocol import MAX_MESSAGE_BYTES
from masa_rt.shipped import examples_dir

# The shipped demo recordings: the clone's examples/demos, or the copy a wheel installs.
EXAMPLE_RECORDINGS = examples_dir() / "demos"


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``masa-rt web`` is told; defaults serve loopback without tokens."""

    server: str = DEFAULT_ADDRESS  # the server's ROUTER (headset sessions, stats)
    pub: str = DEFAULT_PUB_ADDRESS  # the server's PUB (estimates of every session)
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: Path | None = None  # None: browsers need no token (loopback use)
    keydir: Path | None = None  # the server runs --secure: the gateway's CURVE keys
    key_name: str = "web"  # KEYDIR/private/KEY_NAME.key_secret
    recordings: Path | None = EXAMPLE_RECORDINGS  # recordings the headset page can replay
    certfile: Path | None = None  # HTTPS (WebXR needs a secure context off localhost)
    keyfile: Path | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_upload_bytes: int = 16 << 20  # an uploaded .npz recording
    max_unpacked_bytes: int = 256 << 20  # its arrays, uncompressed
    auth_timeout_s: float = 5.0  # a browser must authenticate within this
    snapshot_hz: float = 5.0  # dashboard updates per second
    stats_period_s: float = 1.0  # how often the server's counters are asked for
    forget_s: float = 10.0  # a session silent this long leaves the dashboard
    session_hold_s: float = 30.0  # a closed page's sessions stay its own this long
    max_sessions_per_client: int = 16  # per token name (the server sees one key for all)
    max_headset_pages: int = 256  # pages streaming at once (a DEALER each), as max_sessions
    sndhwm: int = 256  # frames queued towards the server per page before dropping

    @property
    def url(self) -> str:
        scheme = "https" if self.certfile else "http"
        return f"{scheme}://{self.host}:{self.port}"
