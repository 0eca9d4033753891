"""Command line: ``python -m pml_triplets check`` and ``python -m pml_triplets demo``."""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """usage: python -m pml_triplets {check,demo} [options]

  check   compare the adapter with the reference formula on every available device and dtype
  demo    train a small embedder on scikit-learn's digits with predefined triplets (needs the `demo` extra)

Run `python -m pml_triplets COMMAND --help` for the options of each."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "check":
        from .check import main as check_main

        return check_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
