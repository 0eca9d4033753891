"""The command line: ``python -m pml_triplets demo [options]`` (or ``pml-triplets demo``) runs :func:`main`.

It checks its arguments, the ``demo`` extra and the output directory before any work, then loads the digits, trains
the MLP, prints held-out retrieval for raw pixels, the untrained and the trained network, and writes a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .data import load_digits_split
from .model import embed, make_embedder
from .report import evaluate, format_table, save_figure
from .training import BATCH_SIZE, EPOCHS, HARD_POOL_FACTOR, LR, NEGATIVES, TEMPERATURE, torch_threads, train
from .triplets import fewest_other_class

PROG = "python -m pml_triplets demo"
DESCRIPTION = (
    "Train a 64-128-64 MLP on scikit-learn's handwritten digits with InfoNCE on predefined triplets "
    "(pml_triplets.infonce), print held-out precision@1 and MAP@R for raw pixels, the untrained and the trained "
    "network, and write the loss curve and a 2-D projection to DIR/digits_demo.png. "
    'Needs the demo extra: pip install "pml-triplets[demo]".'
)
FIGURE = "digits_demo.png"
# The demo extra of pyproject.toml: the module each distribution provides.
EXTRA = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the demo.

    Returns:
        0 on success; 0 for ``--help``; 2 for bad arguments, a missing ``demo`` extra or an unwritable ``--out``.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the help or the usage error
        return exc.code if isinstance(exc.code, int) else 2
    return execute(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``demo``.

    ``--hard`` and ``--random`` set one option, ``mode``; only ``--hard``, the default, says so.
    """
    p.add_argument("--epochs", type=_positive_int, default=EPOCHS, help="passes over the training anchors")
    p.add_argument("--negatives", "-m", metavar="M", type=_positive_int, default=NEGATIVES, help="negatives per anchor")
    p.set_defaults(mode="hard")  # before the two flags, whose own default is SUPPRESS: no "(default: ...)" on each
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--hard",
        dest="mode",
        action="store_const",
        const="hard",
        default=argparse.SUPPRESS,
        help=f"hard negatives: drawn from each anchor's {HARD_POOL_FACTOR}*M nearest other-class images in pixel "
        "space (the default)",
    )
    mode.add_argument(
        "--random",
        dest="mode",
        action="store_const",
        const="random",
        default=argparse.SUPPRESS,
        help="random negatives: drawn uniformly from all images of other classes",
    )
    p.add_argument("--temperature", type=_positive_float, default=TEMPERATURE, help="InfoNCE temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, triplets and batch order")
    p.add_argument("--out", metavar="DIR", default="demo_out", help="directory for the PNG")
    p.add_argument("--batch-size", type=_positive_int, default=BATCH_SIZE, help="anchors per step")
    p.add_argument("--lr", type=_positive_float, default=LR, help="Adam learning rate")
    # One thread: the matrices are tiny, and on a busy machine spinning intra-op threads cost up to 10x.
    p.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads")


def execute(args: argparse.Namespace) -> int:
    """Run the demo that ``args`` (from :func:`add_arguments`) describe; 2 if it cannot run, before any work."""
    missing = [f"{module} (from {dist})" for module, dist in EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f'error: the demo needs its extra: pip install "pml-triplets[demo]"; missing: {", ".join(missing)}',
            file=sys.stderr,
        )
        return 2
    if problem := out_problem(Path(args.out)):
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    with torch_threads(args.threads):
        return _run(args)


def out_problem(out: Path) -> str | None:
    """Why the figure cannot be written in the directory ``out``, or ``None`` if it can.

    Found by trying, since permission bits tell root nothing: the directory is created and a temporary file is
    written in it; whatever the check created is removed again.
    """
    missing = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create the directory {exc.filename or out}: {exc.strerror}"
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            return f"cannot write in {out}: {exc.strerror}"
        if (out / FIGURE).is_dir():
            return f"{out / FIGURE} is a directory"
        return None
    finally:
        for d in missing:
            with contextlib.suppress(OSError):
                d.rmdir()


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    split = load_digits_split()
    if args.mode == "hard" and args.negatives > fewest_other_class(split.y_train):
        print(f"error: --negatives must be at most {fewest_other_class(split.y_train)} with --hard", file=sys.stderr)
        return 2
    print(
        f"digits: {len(split.y_train)} train / {len(split.y_test)} held-out images; MLP 64-128-64; "
        f"{args.mode} negatives, M={args.negatives}, temperature={args.temperature}, "
        f"{args.epochs} epochs, seed={args.seed}",
        flush=True,  # before the progress report on stderr
    )
    model = make_embedder(seed=args.seed)
    rows = {
        "raw pixels": evaluate(split.x_test, split.y_test),
        "untrained MLP": evaluate(embed(model, split.x_test), split.y_test),
    }
    history = train(
        model,
        split.x_train,
        split.y_train,
        epochs=args.epochs,
        negatives=args.negatives,
        mode=args.mode,
        temperature=args.temperature,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=True,
    )
    emb = embed(model, split.x_test)
    rows["trained MLP"] = evaluate(emb, split.y_test)
    print(f"\nHeld-out retrieval ({len(split.y_test)} images, each querying the others; cosine similarity):")
    print(format_table(rows))
    scores = rows["trained MLP"]
    title = (
        f"digits: {args.mode} negatives, M = {args.negatives}, τ = {args.temperature:g}, {args.epochs} epochs; "
        f"held-out precision@1 = {scores['precision_at_1']:.4f}, MAP@R = {scores['mean_average_precision_at_r']:.4f}"
    )
    path = save_figure(history, emb, split.y_test, Path(args.out) / FIGURE, title=title)
    print(f"\nfinal epoch loss {history.epoch_losses[-1]:.4f}; figure written to {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value
