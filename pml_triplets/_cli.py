"""The argument parsing that ``python -m pml_triplets``, ``check`` and ``demo`` share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

__all__ = ["parse", "run_command"]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status when argparse stops: 0 for ``--help``/``--version``, 2 for misuse."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the help, the version or the usage error
        return exc.code if isinstance(exc.code, int) else 2


def run_command(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    execute: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv`` for one command and run it; return the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_arguments(parser)
    args = parse(parser, argv)
    return args if isinstance(args, int) else execute(args)
