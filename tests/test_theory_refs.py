"""Every § citation in the project names a section (and item) of docs/theory.md.

Code, docs, recipes, benchmarks and tests cite the theory as ``§B.3`` or ``§E.3 item 18``: the
label must be the leading token of a heading of docs/theory.md, and the item a numbered-list item
of that section with that number. Nothing may point outside the repository to the notes the
theory was written from.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
SCANNED = (
    "mflightning",
    "docs",
    "README.md",
    "recipes",
    "benchmarks",
    "tests",
    "Makefile",
    "mkdocs.yml",
    "pyproject.toml",
)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ""}
SKIPPED = {Path(__file__).resolve(), (ROOT / "docs" / "javascripts").resolve()}
FORBIDDEN = (
    "../shared",
    "shared/docs",
    "shared/theory-checks",
    "mf-theory.md",
    "design.md",
    "anchors.md",
)

LABEL = r"(?:\d+(?:\.\d+)?|[A-Z](?:\.\d+)?)"
LABEL_RE = re.compile(rf"^{LABEL}$")
NUMBERS = r"\d+(?:(?:,\s*and\s+|,\s*|\s+and\s+)\d+)*"
CITATION_RE = re.compile(rf"§\s?({LABEL})(?![\w])(?:\s+items?\s+({NUMBERS}))?")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*(?:\{#([\w.-]+)\})?\s*$")
ITEM_RE = re.compile(r"^(\d+)\.\s")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
ANCHOR_LINK_RE = re.compile(r"theory\.md#([\w.-]+)")


@dataclass
class Section:
    """A labelled section of the theory: its heading level and the numbers of its list items."""

    level: int
    items: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Citation:
    """One ``§label`` (with optional item numbers) found at ``where`` (``path:line``)."""

    where: str
    label: str
    items: tuple[int, ...]

    def __str__(self) -> str:
        items = f" item {', '.join(map(str, self.items))}" if self.items else ""
        return f"{self.where}: §{self.label}{items}"


def _outside_fences(lines: list[str]) -> list[tuple[int, str]]:
    """The (1-based line number, line) pairs of a Markdown text outside fenced code blocks."""
    kept, fenced = [], False
    for number, line in enumerate(lines, 1):
        if FENCE_RE.match(line):
            fenced = not fenced
        elif not fenced:
            kept.append((number, line))
    return kept


def parse_theory(text: str) -> tuple[dict[str, Section], set[str]]:
    """Labelled sections of a theory page and the explicit ``{#id}`` anchors of its headings.

    A heading is labelled when its first token is a label (``1``, ``1.2``, ``B``, ``B.3``). A
    section runs to the next heading of the same or a higher level, so a part (``E``) holds the
    items of its subsections. Items are top-level numbered-list lines (``18. ...``).
    """
    sections: dict[str, Section] = {}
    anchors: set[str] = set()
    open_sections: list[str] = []
    for _, line in _outside_fences(text.splitlines()):
        heading = HEADING_RE.match(line)
        if heading:
            level = len(heading.group(1))
            if heading.group(3):
                anchors.add(heading.group(3))
            open_sections = [s for s in open_sections if sections[s].level < level]
            words = heading.group(2).split()
            if words and LABEL_RE.match(words[0]):
                label = words[0]
                assert label not in sections, f"duplicate section label {label} in the theory"
                sections[label] = Section(level)
                open_sections.append(label)
            continue
        item = ITEM_RE.match(line)
        if item:
            for label in open_sections:
                sections[label].items.append(int(item.group(1)))
    return sections, anchors


def find_citations(text: str, where: str) -> list[Citation]:
    """Every ``§label`` / ``§label item n`` / ``§label items n and m`` in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in CITATION_RE.finditer(line):
            items = tuple(int(n) for n in re.findall(r"\d+", match.group(2) or ""))
            found.append(Citation(f"{where}:{number}", match.group(1), items))
    return found


def unresolved(citations: list[Citation], sections: dict[str, Section]) -> list[str]:
    """The citations whose section, or one of whose items, does not exist."""
    bad = []
    for citation in citations:
        section = sections.get(citation.label)
        if section is None:
            bad.append(f"{citation} (no section {citation.label})")
            continue
        missing = [n for n in citation.items if n not in section.items]
        if missing:
            bad.append(f"{citation} (no item {missing} in §{citation.label})")
    return bad


def project_files() -> list[Path]:
    """The text files of the scanned parts of the project (this test excluded)."""
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in candidates:
            resolved = file.resolve()
            if any(resolved == s or s in resolved.parents for s in SKIPPED):
                continue
            if file.is_file() and file.suffix in TEXT_SUFFIXES and "__pycache__" not in file.parts:
                files.append(file)
    return files


def _theory() -> tuple[dict[str, Section], set[str]]:
    return parse_theory(THEORY.read_text(encoding="utf-8"))


def test_theory_has_every_section() -> None:
    sections, _ = _theory()
    expected = (
        ["1", "1.1", "1.2", "1.3"]
        + [f"A.{i}" for i in range(1, 6)]
        + [f"B.{i}" for i in range(1, 6)]
        + [f"C.{i}" for i in range(1, 9)]
        + [f"D.{i}" for i in range(1, 5)]
        + [f"E.{i}" for i in range(1, 5)]
    )
    assert [label for label in expected if label not in sections] == []


def test_items_are_unambiguous_and_render_with_their_numbers() -> None:
    sections, _ = _theory()
    for label, section in sections.items():
        repeated = [n for n, count in Counter(section.items).items() if count > 1]
        assert repeated == [], f"§{label} has several items numbered {repeated}"
    assert sections["E.3"].items == list(range(12, 21))
    # Python-Markdown renumbers ordered lists from 1 unless sane_lists is on.
    assert re.search(r"^\s*-\s*sane_lists\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)


def test_every_citation_resolves() -> None:
    sections, _ = _theory()
    citations = []
    for file in project_files():
        where = str(file.relative_to(ROOT))
        citations += find_citations(file.read_text(encoding="utf-8"), where)
    assert len(citations) > 150, "the scan found too few citations: is it reading the project?"
    bad = unresolved(citations, sections)
    assert not bad, "citations that name no section or item of docs/theory.md:\n" + "\n".join(bad)


def test_nothing_points_outside_the_project() -> None:
    hits = []
    for file in project_files():
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            hits += [f"{file.relative_to(ROOT)}:{number}: {f}" for f in FORBIDDEN if f in line]
    assert not hits, "references outside the project (cite docs/theory.md):\n" + "\n".join(hits)


def test_links_to_theory_anchors_resolve() -> None:
    _, anchors = _theory()
    broken = []
    for file in project_files():
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            broken += [
                f"{file.relative_to(ROOT)}:{number}: #{anchor}"
                for anchor in ANCHOR_LINK_RE.findall(line)
                if anchor not in anchors
            ]
    assert not broken, "links to anchors docs/theory.md does not define:\n" + "\n".join(broken)


FAKE_THEORY = """# Theory

## B The limit {#sec-b}

### B.3 Degeneracy {#sec-b-3}

1. one
2. two

```text
7. not an item: inside a fence
## Z.9 not a heading: inside a fence
```

### B.4 Solvers

3. three

## E Pitfalls

### E.3 Optimizers

18. conv
"""


def test_parser_flags_fake_citations() -> None:
    sections, anchors = parse_theory(FAKE_THEORY)
    assert set(sections) == {"B", "B.3", "B.4", "E", "E.3"}
    assert sections["B.3"].items == [1, 2]
    assert sections["B"].items == [1, 2, 3]
    assert anchors == {"sec-b", "sec-b-3"}
    text = (
        "see §B.3 and §B.3 item 2, §B.4 items 3, §E.3 item 18. (§E.3 item 18)\n"
        "§B.9 and §B.3 item 7, §B.4 items 1 and 3, §Z.9, §E.3 item 12; §3 of a design note\n"
        "§B.3/§E.3 and §B.3-§B.4; §1.1. is §1.1\n"
    )
    citations = find_citations(text, "x")
    assert [str(c) for c in citations[:5]] == [
        "x:1: §B.3",
        "x:1: §B.3 item 2",
        "x:1: §B.4 item 3",
        "x:1: §E.3 item 18",
        "x:1: §E.3 item 18",
    ]
    assert [c.label for c in citations[5:]] == [
        "B.9", "B.3", "B.4", "Z.9", "E.3", "3", "B.3", "E.3", "B.3", "B.4", "1.1", "1.1",
    ]  # fmt: skip
    assert unresolved(citations, sections) == [
        "x:2: §B.9 (no section B.9)",
        "x:2: §B.3 item 7 (no item [7] in §B.3)",
        "x:2: §B.4 item 1, 3 (no item [1] in §B.4)",
        "x:2: §Z.9 (no section Z.9)",
        "x:2: §E.3 item 12 (no item [12] in §E.3)",
        "x:2: §3 (no section 3)",
        "x:3: §1.1 (no section 1.1)",
        "x:3: §1.1 (no section 1.1)",
    ]
