"""The ``masa-rt`` command.

Subcommands are contributed by packages through the ``masa_rt.commands`` entry-point group
(see pyproject.toml), so this core module never imports the trainer, engine or clients.
Each plugin's ``register(subparsers)`` adds parsers whose ``func`` imports heavy modules
lazily, so ``masa-rt --help`` stays fast and the serving commands never import torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from masa_rt import __version__


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2.

    So are ValueError, OSError (a missing file, a directory where a file was expected, a
    port in use, no permission) and any exception whose class sets ``user_facing = True``
    (the engine's BackendError and ExportError, the client's errors): plugins mark their
    own error types that way, since this core module never imports them."""


def is_user_facing(exc: BaseException) -> bool:
    """Bad input or a bad environment, to be reported as one line rather than a traceback."""
    return (isinstance(exc, (CommandError, ValueError, OSError))
            or getattr(type(exc), "user_facing", False) is True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masa-rt",
        description="Real-time multi-activity sequence alignment for AR/VR pose streams.",
    )
    parser.add_argument("--version", action="version", version=f"masa-rt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="masa_rt.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # a plugin whose optional deps are missing
            logging.getLogger("masa_rt.cli").debug("plugin %s unavailable: %s", ep.name, exc)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not is_user_facing(exc):
            raise  # a bug: the traceback is what we need
        # Bad input is reported as one line naming what was wrong, never a traceback.
        print(f"masa-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
