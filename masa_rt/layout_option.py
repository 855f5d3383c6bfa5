"""``--layout-file FILE``: the command-line option that declares a layout
(``masa_rt.layout_file``) on every command that reads data.

Light on purpose (as ``masa_rt.cli_types``): the file is read by the option's type
function, which imports numpy and pyyaml only when the option is given, so ``masa-rt
--help`` stays fast.
"""

from __future__ import annotations

import argparse

__all__ = ["add_layout_file_option", "layout_files"]


def add_layout_file_option(parser: argparse.ArgumentParser) -> None:
    """``--layout-file FILE`` (repeatable) on a command that reads data."""
    parser.add_argument("--layout-file", action="append", default=None, metavar="FILE",
                        type=declared_layout_file,
                        help="declare a layout masa-rt does not know, from a YAML/JSON "
                             "file (docs/formats.md, 'Layout files'); repeatable")


def declared_layout_file(path: str) -> str:
    """argparse type: the layout is declared as the command line is read, so every later
    step (files, models; child processes are given the paths) knows it by name. A bad
    file is one usage error naming the file and the problem."""
    from masa_rt.layout_file import LayoutFileError, load_layout_file

    try:
        load_layout_file(path)
    except (LayoutFileError, FileNotFoundError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


def layout_files(args: argparse.Namespace) -> list[str]:
    """The ``--layout-file`` paths given (none: [])."""
    return list(getattr(args, "layout_file", None) or [])
