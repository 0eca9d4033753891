"""The argument parsing that ``python -m pml_triplets`` and ``check`` share (the demo example parses its own)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["CommandParser", "parse", "run_command"]


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that rejects unknown arguments itself, so the error shows the subcommand's usage.

    argparse parses a subcommand with ``parse_known_args`` and hands what it did not recognize back to the top-level
    parser, whose error would print ``usage: python -m pml_triplets [-h] [--version] COMMAND ...`` instead.
    """

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


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
