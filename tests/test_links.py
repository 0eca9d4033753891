"""Links that work: no URL of a repository that is not known to exist; README and docs links that resolve in the clone.

``mkdocs build --strict`` checks the docs pages' links and anchors too (tests/test_docs.py, .ci/run); these checks are
the fast ones, and they cover the README, which the site does not build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# No repository or tag there is known to exist. Spelled in two parts so that this file does not match itself.
UNPUBLISHED = "github.com/" + "pml-triplets"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def tracked_text_files() -> list[Path]:
    """Tracked files and those git would add (not ignored), except binary ones (a NUL byte in the first 8 KiB)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=60)
    paths = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    return [p for p in paths if p.is_file() and b"\0" not in p.read_bytes()[:8192]]


def targets(page: Path = README) -> list[str]:
    """Every link target of a Markdown page outside code blocks."""
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def headings(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (a `# comment` in a code block is no heading)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M)}


def is_relative(target: str) -> bool:
    return not re.match(r"(https?:|mailto:|#)", target)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except hyphens, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_no_file_links_to_the_unpublished_repository() -> None:
    files = tracked_text_files()
    assert README in files
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if UNPUBLISHED in line
    ]
    assert not offenders, f"{UNPUBLISHED} is not known to exist; use relative links: {offenders}"


def test_relative_readme_links_resolve() -> None:
    relative = [t for t in targets() if is_relative(t)]
    assert relative, "the README links the docs, the changelog and the notebooks by relative path"
    missing = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README links to files that are not in the repository: {missing}"


def test_readme_anchors_name_headings() -> None:
    """`#section` names a heading of the README, `docs/page.md#section` one of that page."""
    anchored = [t.split("#", 1) for t in targets() if "#" in t and not t.startswith("http")]
    assert anchored, "the README links at least one section of a docs page"
    unknown = [f"{p}#{a}" for p, a in anchored if a not in headings(ROOT / p if p else README)]
    assert not unknown, f"README anchors without a heading: {unknown}"


def test_docs_links_stay_in_docs_and_resolve() -> None:
    """The site holds docs/ only: a page links other pages by relative path, and code outside docs/ as text."""
    pages = sorted(DOCS.rglob("*.md"))
    assert len(pages) >= 10, pages
    bad = []
    for page in pages:
        for target in filter(is_relative, targets(page)):
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            if not resolved.is_relative_to(DOCS) or not resolved.is_file():
                bad.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in headings(resolved):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, f"docs links that leave docs/ or do not resolve: {bad}"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        pytest.param("How the work is handed to PML", "how-the-work-is-handed-to-pml", id="words"),
        pytest.param("torch.compile and torch.func", "torchcompile-and-torchfunc", id="dots-dropped"),
        pytest.param("Multi-GPU (DistributedDataParallel)", "multi-gpu-distributeddataparallel", id="hyphen-kept"),
    ],
)
def test_slug(heading: str, expected: str) -> None:
    assert slug(heading) == expected
