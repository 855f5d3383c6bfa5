"""CLI commands contributed by trainer (see masa_rt.cli)."""


def register(subparsers) -> None:
    """Add this package's subcommands to the masa-rt parser."""
