"""Command line: ``python -m pml_triplets {check,demo}`` (also installed as the ``pml-triplets`` script)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, check, demo
from ._cli import CommandParser, parse

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="InfoNCE on predefined (anchor, positive, negatives) triplets, through pytorch-metric-learning.",
        epilog=f"Run '{prog} COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"pml_triplets {__version__}")
    # CommandParser: `demo --bogus` is an error of `demo`, shown with demo's usage.
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", parser_class=CommandParser)
    for name, module in (("check", check), ("demo", demo)):
        sub = commands.add_parser(
            name,
            help=module.SUMMARY,
            description=module.DESCRIPTION,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(execute=module.execute)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; return the exit status.

    No command prints the help to stderr and returns 2; ``--help`` and ``--version`` return 0, a usage error 2.
    """
    # The name the user typed: the console script, or the module.
    prog = "pml-triplets" if Path(sys.argv[0]).stem == "pml-triplets" else "python -m pml_triplets"
    parser = _parser(prog)
    args = parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = args.execute(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
