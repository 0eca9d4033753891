"""The command line: subcommands, ``--version``, help texts, exit statuses, the console script."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import pml_triplets as pt
from pml_triplets import check
from pml_triplets.__main__ import main
from pml_triplets_demo import cli as demo
from pml_triplets_demo import training


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pml_triplets {version('pml-triplets')}\n"
    assert pt.__version__ == version("pml-triplets")


def test_no_command_prints_help_to_stderr_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: python -m pml_triplets [-h] [--version] COMMAND ...")
    assert "check " in err
    assert "demo " in err


@pytest.mark.slow  # a subprocess
def test_module_entry_point() -> None:
    """The real ``python -m pml_triplets``, in a subprocess: no command is a usage error."""
    done = subprocess.run([sys.executable, "-m", "pml_triplets"], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: python -m pml_triplets [-h] [--version] COMMAND ...")


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [pytest.param([], id="top"), ["check"], ["demo"]])
def test_help_texts_are_clean(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['python -m pml_triplets', *argv])} ")
    assert "``" not in out
    assert ":func:" not in out
    if argv:
        assert "(default: " in out


def test_check_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the wrapping, which depends on the terminal width
    for text in ("anchors N (default: 16)", "negatives per anchor M (default: 8)", "embedding size d (default: 32)"):
        assert text in out


def test_demo_help_names_one_default_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[--hard | --random]" in out
    hard = out[out.index("--hard hard negatives") : out.index("--random random negatives")]
    random = out[out.index("--random random negatives") : out.index("--temperature TEMPERATURE InfoNCE")]
    assert hard.endswith("(the default) ")
    assert "default" not in random
    assert "(default: hard)" not in out
    assert "--epochs EPOCHS passes over the training anchors (default: 20)" in out
    assert 'pip install "pml-triplets[demo]"' in out


def test_subcommands_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []

    def record(args: argparse.Namespace) -> int:
        seen.append(args)
        return 7

    monkeypatch.setattr(demo, "execute", record)
    monkeypatch.setattr(check, "execute", record)
    assert main(["demo", "--epochs", "3", "--random"]) == 7
    assert main(["demo"]) == 7
    assert main(["check", "--n", "5"]) == 7
    assert (seen[0].epochs, seen[0].mode) == (3, "random")
    assert (seen[1].epochs, seen[1].mode, seen[1].negatives) == (training.EPOCHS, "hard", training.NEGATIVES)
    assert (seen[2].n, seen[2].m) == (5, 8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--hard", "--random"], "argument --random: not allowed with argument --hard"),
        (["demo", "--epochs", "0"], "argument --epochs: must be >= 1; got 0"),
        (["check", "--m", "x"], "argument --m: invalid int value: 'x'"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        pytest.param(["demo", "--bogus"], "usage: python -m pml_triplets demo [-h] [--epochs EPOCHS]", id="demo"),
        pytest.param(["check", "--bogus", "1"], "usage: python -m pml_triplets check [-h] [--n N]", id="check"),
        pytest.param(["check", "--n", "5", "extra"], "usage: python -m pml_triplets check [-h]", id="check-positional"),
    ],
)
def test_unknown_argument_shows_the_subcommand_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert " ".join(err.split()).startswith(usage)  # undo the wrapping, which depends on the terminal width
    command = argv[0]
    unknown = " ".join(a for a in argv[1:] if a not in ("--n", "5"))
    assert f"python -m pml_triplets {command}: error: unrecognized arguments: {unknown}\n" in err
    assert "COMMAND ..." not in err  # not the top-level usage


@pytest.mark.parametrize("argv", [["--bogus", "demo"], ["--bogus", "demo", "--epochs", "3"], ["--bogus", "check"]])
def test_unknown_top_level_argument_shows_the_top_level_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("usage: python -m pml_triplets [-h] [--version] COMMAND ...")
    assert err.endswith("python -m pml_triplets: error: unrecognized arguments: --bogus")


@pytest.mark.parametrize("argv", [["--version", "demo"], ["-h", "demo", "--epochs", "3"]])
def test_top_level_options_before_demo_are_the_top_levels(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(("pml_triplets ", "usage: python -m pml_triplets [-h] [--version] COMMAND ..."))


def test_demo_not_installed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without the example (an editable install made before it moved) says so, and how to fix it."""
    for module in ("pml_triplets_demo", "pml_triplets_demo.cli"):
        monkeypatch.setitem(sys.modules, module, None)  # what the import system reports for a missing module
    assert main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "error: the demo's package, pml_triplets_demo, is not installed; reinstall pml-triplets "
        '(from a clone: pip install -e ".[demo]")\n'
    )
    assert main(["check", "--help"]) == 0  # the library's own command needs no demo
    assert capsys.readouterr().out.startswith("usage: python -m pml_triplets check ")


def test_check_command_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--n", "4", "--m", "2", "--d", "4"]) == 0  # small: the check at its defaults takes 9 s
    out = capsys.readouterr().out
    assert "|d loss|" in out
    assert "grad err" in out
    assert "bfloat16" in out
    assert "cpu    float16" in out
    assert "in-batch+ids+mask,K=2" in out
    assert " 0 failed" in out
    assert " NO" not in out


SCRIPT = Path(sys.executable).with_name("pml-triplets")


def test_usage_names_the_console_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pml-triplets"])
    assert main(["demo", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: pml-triplets demo ")


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"console script not installed next to {sys.executable}")
@pytest.mark.slow  # a subprocess
def test_console_script() -> None:
    done = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, f"pml_triplets {version('pml-triplets')}\n")


@pytest.mark.slow  # a subprocess
def test_demo_with_an_unwritable_out_fails_at_once(tmp_path: Path) -> None:
    """Issue 19, item 10c: the real command, no training, one line naming --out (it used to train, then crash)."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "figures"
    cmd = [sys.executable, "-m", "pml_triplets", "demo", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: --out {out}: cannot create the directory {out}: Not a directory\n"
