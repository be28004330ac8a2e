"""The repository stands alone: its citations point inside it, and its links resolve.

* every anchor of docs/format.md cited anywhere (code, tests, READMEs) names an anchor that
  docs/format.md defines, and so does every ``#anchor`` link inside a Markdown file and every
  relative Markdown link;
* no file cites design notes that live outside the repository, or a path of the machine it
  was written on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMAT = ROOT / "docs" / "format.md"
_SKIP_DIRS = {
    ".git",
    ".hypothesis",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
    "venvs",
}
_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".json", ".lock", ""}
_ANCHOR_DEF = re.compile(r'<a id="([a-z0-9-]+)"></a>')
_FORMAT_REF = re.compile(r"docs/format\.md#([A-Za-z0-9_-]+)")
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")

# Built from pieces so that this file does not match itself.
_FORBIDDEN = [
    re.compile(p)
    for p in (
        r"\.\./" + "shared",
        "/" + r"work/",
        "/" + r"root/",
        r"\bFORMAT" + r"\.md\b",
        r"\bDESIGN" + r"\.md\b",
        r"\bLAYOUT" + r"\.md\b",
        r"\bSTYLE" + r"\.md\b",
        r"\bresearch/[a-z-]+\.md",
        "\N{SECTION SIGN}" + r"\s?\d",
    )
]


def repository_files() -> Iterator[Path]:
    """Text files of the repository, without virtual environments, caches or build output."""
    stack = [ROOT]
    while stack:
        folder = stack.pop()
        for path in sorted(folder.iterdir()):
            if path.name == ".git":  # a folder, or a file in a git worktree
                continue
            if path.is_dir():
                if path.name not in _SKIP_DIRS and not path.name.startswith(".venv"):
                    stack.append(path)
            elif path.suffix in _SUFFIXES and path.stat().st_size < 2_000_000:
                yield path


def text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def anchors(markdown: Path) -> set[str]:
    """Explicit ``<a id>`` anchors plus GitHub's slugs of the headings."""
    content = markdown.read_text(encoding="utf-8")
    slugs = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{1,6} (.+)$", content, re.MULTILINE)
    }
    return set(_ANCHOR_DEF.findall(content)) | slugs


def test_format_doc_defines_its_anchors_once() -> None:
    defined = _ANCHOR_DEF.findall(FORMAT.read_text(encoding="utf-8"))
    assert len(defined) >= 30
    assert len(defined) == len(set(defined))


def test_every_citation_of_the_format_doc_names_an_anchor_it_has() -> None:
    defined = anchors(FORMAT)
    missing = [
        f"{path.relative_to(ROOT)}: #{anchor}"
        for path in repository_files()
        if (content := text(path)) is not None
        for anchor in _FORMAT_REF.findall(content)
        if anchor not in defined
    ]
    assert missing == []


@pytest.mark.parametrize(
    "markdown",
    [p for p in repository_files() if p.suffix == ".md" and "results" not in p.parts],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_markdown_links_resolve(markdown: Path) -> None:
    broken = []
    for target in _MD_LINK.findall(markdown.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto: …
            continue
        file_part, _, anchor = target.partition("#")
        linked = (markdown.parent / file_part).resolve() if file_part else markdown
        exists = linked.exists()
        if not exists or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_no_file_cites_notes_outside_the_repository_or_a_machine_path() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in repository_files()
        if (content := text(path)) is not None
        for number, line in enumerate(content.splitlines(), 1)
        if any(p.search(line) for p in _FORBIDDEN)
    ]
    assert found == []
