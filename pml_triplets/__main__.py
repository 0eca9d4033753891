"""Command line: ``python -m pml_triplets {check,demo}`` (also installed as the ``pml-triplets`` script).

``demo`` runs the digits demo, an example application installed beside the library (``pml_triplets_demo``, from
``examples/pml_triplets_demo/``): it is imported only when asked for, and parses its own arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, check
from ._cli import CommandParser, parse

__all__ = ["main"]

DEMO_SUMMARY = "train a small embedder on scikit-learn's digits with predefined triplets (needs the demo extra)"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="InfoNCE on predefined (anchor, positive, negatives) triplets, through pytorch-metric-learning.",
        epilog=f"Run '{prog} COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"pml_triplets {__version__}")
    # CommandParser: `check --bogus` is an error of `check`, shown with check's usage.
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", parser_class=CommandParser)
    sub = commands.add_parser(
        "check",
        help=check.SUMMARY,
        description=check.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    check.add_arguments(sub)
    sub.set_defaults(execute=check.execute)
    commands.add_parser("demo", help=DEMO_SUMMARY, add_help=False)  # listed here; main hands it its arguments
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; return the exit status.

    No command prints the help to stderr and returns 2; ``--help`` and ``--version`` return 0, a usage error 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # The name the user typed: the console script, or the module.
    prog = "pml-triplets" if Path(sys.argv[0]).stem == "pml-triplets" else "python -m pml_triplets"
    parser = _parser(prog)
    # No top-level option takes a value, so the command is the first argument that is not an option.
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    args = parse(parser, argv[: at + 1] if argv[at : at + 1] == ["demo"] else argv)
    if isinstance(args, int):
        return args
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        return _demo(argv[at + 1 :], f"{prog} demo")
    status: int = args.execute(args)
    return status


def _demo(argv: list[str], prog: str) -> int:
    """Run the digits demo with ``argv``; the example is imported here, so no other command needs it."""
    try:
        from pml_triplets_demo.cli import main as demo_main
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "pml_triplets_demo":
            raise
        print(
            "error: the demo's package, pml_triplets_demo, is not installed; reinstall pml-triplets "
            '(from a clone: pip install -e ".[demo]")',
            file=sys.stderr,
        )
        return 2
    return demo_main(argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
