"""``masa-rt keys new|list``: CURVE keypairs for ``serve --secure KEYDIR`` and its clients.

Wired by ``register(subparsers)``; the work is done in :mod:`engine.security`, and the
handlers below (``keys_new``, ``keys_list``) can be called directly (tests do).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.security import DEFAULT_KEYDIR, create_keypair, list_keys


def keys_new(name: str, keydir: Path | str = DEFAULT_KEYDIR, *, server: bool = False,
             force: bool = False, operator: bool = False, out=print) -> tuple[Path, Path]:
    """Make NAME's keypair in ``keydir`` and say where it went and what to copy where."""
    keydir = Path(keydir).expanduser()
    public, secret = create_keypair(keydir, name, server=server, force=force,
                                    operator=operator)
    out(f"public key: {public}")
    out(f"secret key: {secret} (0600, keep it private)")
    if server:
        out(f"serve with: masa-rt serve --secure {keydir} ...")
        out(f"give every client a copy of {public} (as KEYDIR/server/{public.name})")
    else:
        what = ("operator (reads every tenant's estimates on the PUB socket)" if operator
                else "allow-listed")
        out(f"{what}: {public} (remove the file to revoke)")
        out(f"on the client, put {secret.name} in KEYDIR/private/ and the server's public "
            "key in KEYDIR/server/; then load_client_keys(KEYDIR, "
            f"{name!r}) gives PoseOutlet(curve=...) its keys")
    return public, secret


def keys_list(keydir: Path | str = DEFAULT_KEYDIR, *, out=print) -> int:
    """Print one line per key: role, name, public key, secret file. Returns how many."""
    keydir = Path(keydir).expanduser()
    keys = list_keys(keydir)
    if not keys:
        out(f"no keys in {keydir} (masa-rt keys new NAME [--server] --dir {keydir})")
    for k in keys:
        if k.secret_file is None:
            secret = "-"
        else:
            secret = str(k.secret_file) + ("" if k.secret_mode_ok else "  (UNSAFE: chmod 600)")
        out(f"{k.role:<8}  {k.name:<20}  {k.public}  {secret}")
    return len(keys)


def _new(args: argparse.Namespace) -> int:
    keys_new(args.name, args.dir, server=args.server, force=args.force,
             operator=args.operator)
    return 0


def _list(args: argparse.Namespace) -> int:
    keys_list(args.dir)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``keys new`` and ``keys list`` to the masa-rt parser."""
    keys = subparsers.add_parser("keys", help="CURVE keys for encrypted, allow-listed serving")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = sub.add_parser("new", help="make a keypair (a client's by default)")
    p.add_argument("name", help="key name, e.g. the headset's (files NAME.key, NAME.key_secret)")
    p.add_argument("--dir", type=Path, default=DEFAULT_KEYDIR, metavar="KEYDIR",
                   help="key directory (default ~/.config/masa-rt/keys)")
    p.add_argument("--server", action="store_true", help="the server's keypair (one per KEYDIR)")
    p.add_argument("--operator", action="store_true",
                   help="an operator's keypair: may read every tenant's estimates on the PUB "
                        "socket (dashboards); a client reads only its own")
    p.add_argument("--force", action="store_true", help="replace an existing key of that name")
    p.set_defaults(func=_new)
    p = sub.add_parser("list", help="list the server key and the clients' keys")
    p.add_argument("--dir", type=Path, default=DEFAULT_KEYDIR, metavar="KEYDIR",
                   help="key directory (default ~/.config/masa-rt/keys)")
    p.set_defaults(func=_list)
