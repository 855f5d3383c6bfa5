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
from masa_rt.extras import install_hint


def _with_default(action: argparse.Action) -> str:
    """An option's help with its default appended, unless the help already says one or the
    default is empty (None, False: "not given"), where a printed value would mislead."""
    text = action.help or ""
    if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings):
        return text
    return f"{text} (default: %(default)s)".lstrip()


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help with each option's default (see :func:`_with_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _with_default(action)


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
    _add_logging_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="masa_rt.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # a plugin whose optional deps are missing
            logging.getLogger("masa_rt.cli").debug("plugin %s unavailable: %s", ep.name, exc)
            continue
        register(sub)
    for command in _subparsers(parser):
        _show_defaults(command)
        _add_logging_flags(command)
    return parser


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Our own loggers follow --log-level; every other library's stay at WARNING unless DEBUG
# is asked for (an export printed ~75 lines of onnxscript INFO otherwise).
OUR_LOGGERS = ("masa_rt", "engine", "trainer", "clients")


def _add_logging_flags(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """-v / -q / --log-level, before or after the subcommand: a subcommand's own copies
    default to SUPPRESS so they never undo the flag given before it."""
    extra = {"default": "INFO"} if top else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                       const="DEBUG", help="debug logging (same as --log-level DEBUG)",
                       **extra)
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const",
                       const="WARNING", help="warnings and errors only", **extra)
    group.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS,
                       help="log level of masa-rt's own messages (default INFO)", **extra)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Defaults in this parser's --help, keeping its own formatter's layout (an epilog of
    examples stays verbatim)."""
    own = parser.formatter_class
    parser.formatter_class = (DefaultsHelpFormatter if own is argparse.HelpFormatter else
                              type("Formatter", (DefaultsHelpFormatter, own), {}))
    for action in parser._actions:  # argparse prints no help line at all for help=None
        if action.help is None and action.option_strings:
            action.help = _with_default(action) or None


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (sub)command parser below ``parser``, nested ones included."""
    found = []
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += [child, *_subparsers(child)]
    return found


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=logging.DEBUG if level == "DEBUG" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        hint = install_hint(exc.name or "")
        if hint is None:
            raise  # not an optional dependency: a broken install or a bug
        print(f"masa-rt {args.command}: error: needs {exc.name}, which this install lacks: "
              f"{hint}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_user_facing(exc):
            raise  # a bug: the traceback is what we need
        # Bad input is reported as one line naming what was wrong, never a traceback.
        print(f"masa-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
