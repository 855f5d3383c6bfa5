"""CURVE encryption and client allow-listing (ZAP) for the masa-rt server and clients.

Pose streams are biometric data and headsets sit on shared Wi-Fi, so off-host the server
runs with ZeroMQ CURVE: every link is encrypted, and a ZAP handler admits only clients
whose public key is on the allow-list. Plain TCP stays the default, for loopback.

Key directory (``masa-rt keys new``; default :data:`DEFAULT_KEYDIR`)::

    KEYDIR/server/NAME.key           server public key (clients need a copy)
    KEYDIR/server/NAME.key_secret    server keypair, 0600 (never leaves the server)
    KEYDIR/clients/NAME.key          allow-list: one public key per client
    KEYDIR/operators/NAME.key        operators: allowed too, and may read every tenant's
                                     estimates on the PUB socket (engine.estimate_feed)
    KEYDIR/private/NAME.key_secret   a client's keypair, 0600 (copy it to that client only)

Files are ZeroMQ certificates (``zmq.auth.create_certificates``). ``server/`` holds exactly
one keypair. A client machine uses the same layout: ``server/NAME.key`` (public) and its
own ``private/NAME.key_secret``; :func:`load_client_keys` reads them.

Server side (see docs/security.md for the wiring)::

    auth = start_authenticator(ctx, keydir)    # before any bind, on the sockets' context
    apply_server_curve(router, keydir)         # before bind; same for the PUB socket
    ...
    auth.stop()                                # before ctx.term()
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from clients._sockets import CurveKeys

__all__ = [
    "DEFAULT_KEYDIR",
    "KeyInfo",
    "SecurityConfig",
    "ZapAuthenticator",
    "apply_server_curve",
    "create_keypair",
    "is_loopback",
    "list_keys",
    "load_client_keys",
    "plain_mode_warning",
    "start_authenticator",
]

log = logging.getLogger("masa_rt.security")

DEFAULT_KEYDIR = Path.home() / ".config" / "masa-rt" / "keys"
SERVER_DIR, CLIENTS_DIR, PRIVATE_DIR = "server", "clients", "private"
OPERATORS_DIR = "operators"
PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_LOOPBACK_NAMES = ("localhost", "lo", "lo0")


@dataclass(frozen=True)
class SecurityConfig:
    """``keydir=None``: plain mode (loopback only); else CURVE with KEYDIR's allow-list."""

    keydir: Path | None = None

    @property
    def secure(self) -> bool:
        return self.keydir is not None


# ---------------------------------------------------------------------- key files


@dataclass(frozen=True)
class KeyInfo:
    """One key as listed by :func:`list_keys`."""

    role: str  # "server" | "client" | "operator"
    name: str
    public: str  # Z85
    secret_file: Path | None  # None: public key only (e.g. a listed remote client)
    secret_mode_ok: bool  # the secret file is readable by its owner only (or absent)


def _check_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"bad key name {name!r}: 1-64 of [A-Za-z0-9._-], not starting with '.'")
    return name


def _private_dir(path: Path) -> Path:
    """Make ``path`` (and parents) if missing; a new directory is owner-only (0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _mode_ok(path: Path) -> bool:
    """A secret file must not be readable by group or others (as ssh insists)."""
    return os.name != "posix" or not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``.key_secret`` file; refuses loose permissions."""
    if not path.is_file():
        raise FileNotFoundError(f"secret key {path} not found (masa-rt keys new)")
    if not _mode_ok(path):
        raise ValueError(f"secret key {path} is readable by others: chmod 600 {path}")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def create_keypair(keydir: Path | str, name: str, *, server: bool = False,
                   force: bool = False, operator: bool = False) -> tuple[Path, Path]:
    """Make a CURVE keypair; return (public file, secret file). The secret is 0600.

    A client's public key goes to ``clients/`` (the allow-list) and its keypair to
    ``private/``; with ``server=True`` both go to ``server/``, which may hold only one
    keypair; an ``operator``'s public key goes to ``operators/`` instead of ``clients/``.
    Existing files are kept unless ``force``. The keys are written inside an
    owner-only temporary directory and moved into place, so a secret is never readable
    by others, not even for a moment.
    """
    keydir = Path(keydir).expanduser()
    _check_name(name)
    if server and operator:
        raise ValueError("a key is the server's or an operator's, not both")
    public_dir = keydir / (SERVER_DIR if server else OPERATORS_DIR if operator else CLIENTS_DIR)
    secret_dir = keydir / (SERVER_DIR if server else PRIVATE_DIR)
    public_file = public_dir / (name + PUBLIC_SUFFIX)
    secret_file = secret_dir / (name + SECRET_SUFFIX)
    if server:
        others = [p for p in _server_dir_files(keydir) if p.stem != name]
        if others:
            raise ValueError(f"{public_dir} already holds a server key ({others[0].name}); "
                             "remove it first (every client must then get the new one)")
    if not force:
        for path in (public_file, secret_file):
            if path.exists():
                raise ValueError(f"{path} exists (--force replaces it: clients must then "
                                 "get the new public key)")
    _private_dir(keydir)
    _private_dir(secret_dir)
    public_dir.mkdir(mode=0o755 if not server else 0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-key-", dir=keydir))  # 0700
    try:
        made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        made_secret.chmod(0o600)
        made_public.chmod(0o644)
        os.replace(made_secret, secret_file)
        os.replace(made_public, public_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("event=key_created role=%s name=%s public=%s",
             "server" if server else "operator" if operator else "client", name, public_file)
    return public_file, secret_file


def _server_dir_files(keydir: Path) -> list[Path]:
    d = keydir / SERVER_DIR
    return sorted(d.glob("*" + PUBLIC_SUFFIX)) if d.is_dir() else []


def _one_server_file(keydir: Path, suffix: str) -> Path:
    d = Path(keydir).expanduser() / SERVER_DIR
    found = sorted(d.glob("*" + suffix)) if d.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no server key in {d} (masa-rt keys new NAME --server "
                                f"--dir {Path(keydir).expanduser()})")
    if len(found) > 1:
        raise ValueError(f"{d} holds {len(found)} server keys; keep exactly one")
    return found[0]


def _names(folder: Path, suffix: str) -> set[str]:
    return ({p.name[:-len(suffix)] for p in folder.glob("*" + suffix)} if folder.is_dir()
            else set())


def list_keys(keydir: Path | str) -> list[KeyInfo]:
    """The server key and every client key under ``keydir`` (listed or with a secret)."""
    keydir = Path(keydir).expanduser()
    out: list[KeyInfo] = []
    for role, pub_dir, sec_dir in (("server", SERVER_DIR, SERVER_DIR),
                                   ("client", CLIENTS_DIR, PRIVATE_DIR),
                                   ("operator", OPERATORS_DIR, PRIVATE_DIR)):
        names = _names(keydir / pub_dir, PUBLIC_SUFFIX)
        if role != "operator":  # private/ holds clients' and operators' keypairs alike
            names |= _names(keydir / sec_dir, SECRET_SUFFIX) - _names(
                keydir / OPERATORS_DIR, PUBLIC_SUFFIX)
        for name in sorted(names):
            pub_file = keydir / pub_dir / (name + PUBLIC_SUFFIX)
            sec_file = keydir / sec_dir / (name + SECRET_SUFFIX)
            source = pub_file if pub_file.is_file() else sec_file
            public, _ = zmq.auth.load_certificate(source)
            has_secret = sec_file.is_file()
            out.append(KeyInfo(role, name, public.decode("ascii"),
                               sec_file if has_secret else None,
                               _mode_ok(sec_file) if has_secret else True))
    return out


# ---------------------------------------------------------------------- server side


class _KeyList:
    """The public keys in one folder, re-read when the folder changes (a key file added or
    removed), so allow-list edits apply to new connections without a restart."""

    def __init__(self, folder: Path, required: bool) -> None:
        self.folder, self.required = folder, required
        self.keys: frozenset[bytes] = frozenset()
        self._stamp: int | None = None
        self._lock = threading.Lock()

    def reload(self) -> int:
        with self._lock:
            try:
                self._stamp = self.folder.stat().st_mtime_ns
                keys = zmq.auth.load_certificates(self.folder)
            except OSError as exc:
                if not self.required and isinstance(exc, FileNotFoundError):
                    self._stamp, self.keys = None, frozenset()  # optional: none is fine
                    return 0
                log.error("event=allow_list_unreadable dir=%s error=%s", self.folder, exc)
                self._stamp, keys = None, {}
            self.keys = frozenset(keys)
        return len(self.keys)

    def fresh(self) -> frozenset[bytes]:
        try:
            stamp = self.folder.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self.reload()
        return self.keys


class ZapAuthenticator(ThreadAuthenticator):
    """ZAP handler admitting only CURVE clients whose public key is in ``clients/`` or
    ``operators/``.

    Every denial is logged (``event=zap_denied``) and counted (:attr:`denied`). The
    allow-lists are re-read when their directory changes, so removing ``clients/NAME.key``
    revokes that client for new connections without a restart (a connection already
    established stays up until it drops). An allowed connection's ZMQ ``User-Id``
    property is the client's Z85 public key (``frame.get("User-Id")``, with copy=False).
    """

    def __init__(self, context: zmq.Context, keydir: Path | str) -> None:
        super().__init__(context, log=logging.getLogger("masa_rt.security.zap"))
        keydir = Path(keydir).expanduser()
        self.clients_dir = keydir / CLIENTS_DIR
        self._clients = _KeyList(self.clients_dir, required=True)
        self._operators = _KeyList(keydir / OPERATORS_DIR, required=False)
        self.allowed = 0
        self.denied = 0
        self.reload()

    @property
    def _keys(self) -> frozenset[bytes]:
        return self._clients.keys | self._operators.keys

    def reload(self) -> int:
        """Re-read the allow-lists now; return how many keys (clients and operators)."""
        count = self._clients.reload() + self._operators.reload()
        if not count:
            log.warning("event=allow_list_empty dir=%s detail=\"no client can connect; "
                        "masa-rt keys new NAME\"", self.clients_dir)
        return count

    def is_operator(self, key: bytes) -> bool:
        """Whether ``key`` (Z85) may read every tenant's estimates."""
        return key in self._operators.fresh()

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials-provider hook pyzmq calls with a client's Z85 public key."""
        ok = key in self._clients.fresh() or key in self._operators.fresh()
        if ok:
            self.allowed += 1
            log.debug("event=zap_allowed client_key=%s", key.decode("ascii", "replace"))
        else:
            self.denied += 1
            log.warning("event=zap_denied client_key=%s reason=not_on_allow_list denied=%d",
                        key.decode("ascii", "replace"), self.denied)
        return ok

    def counters(self) -> dict[str, int]:
        """For the server's stats: ``auth.allowed`` and ``auth.denied`` handshakes."""
        return {"auth.allowed": self.allowed, "auth.denied": self.denied}


def start_authenticator(ctx: zmq.Context, keydir: Path | str) -> ZapAuthenticator:
    """Start the ZAP handler on ``ctx`` (call before binding; ``.stop()`` before term).

    Without a running handler libzmq admits every CURVE client that knows the server's
    public key, so the server must not bind before this returns.
    """
    keydir = Path(keydir).expanduser()
    if not keydir.is_dir():
        raise FileNotFoundError(f"key directory {keydir} not found (masa-rt keys new)")
    auth = ZapAuthenticator(ctx, keydir)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=auth)
    log.info("event=zap_started allow_list=%s clients=%d", auth.clients_dir, len(auth._keys))
    return auth


def apply_server_curve(socket: zmq.Socket, keydir: Path | str) -> bytes:
    """Make ``socket`` a CURVE server with KEYDIR's server keypair (before bind).

    Returns the server's Z85 public key (clients need it). A peer without CURVE, or with
    a key not on the allow-list, is dropped in the handshake: it never gets a message.
    """
    public, secret = _load_secret(_one_server_file(keydir, SECRET_SUFFIX))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return public


def is_loopback(bind: str) -> bool:
    """Whether an endpoint is reachable from this machine only.

    ``ipc://``/``inproc://`` and TCP on 127.0.0.0/8, ``::1``, ``localhost`` or the ``lo``
    interface are; ``*``, ``0.0.0.0``, ``::``, other addresses, host and interface names
    are not (when in doubt, not loopback, so plain mode warns).
    """
    scheme, sep, rest = bind.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme not in ("tcp", "ws", "wss", "udp"):
        return False
    rest = rest.split("/", 1)[0].rsplit(";", 1)[-1]  # drop a ws path or a source address
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def plain_mode_warning(bind: str, logger: logging.Logger | None = None) -> str | None:
    """Log (and return) a warning if plain mode binds a non-loopback endpoint, else None."""
    if is_loopback(bind):
        return None
    text = (f"{bind} is reachable from other machines but NOT encrypted: pose streams "
            "(biometric data) travel in clear and any host can open sessions; bind "
            "tcp://127.0.0.1 or use --secure KEYDIR (docs/security.md)")
    (logger or log).warning("event=plain_mode endpoint=%s detail=\"%s\"", bind, text)
    return text


# ---------------------------------------------------------------------- client side


def load_client_keys(keydir: Path | str | None, name: str) -> CurveKeys:
    """Keys for ``PoseOutlet(..., curve=...)`` / ``EstimateInlet``: the server's public key
    (``server/*.key``) and this client's keypair (``private/NAME.key_secret``, 0600)."""
    keydir = Path(keydir).expanduser() if keydir is not None else DEFAULT_KEYDIR
    server_public, _ = zmq.auth.load_certificate(_one_server_file(keydir, PUBLIC_SUFFIX))
    public, secret = _load_secret(keydir / PRIVATE_DIR / (_check_name(name) + SECRET_SUFFIX))
    return CurveKeys(server_public=server_public, public=public, secret=secret)
