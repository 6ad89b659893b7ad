"""The specification, docs/spec.md, against what cites it.

The code, the README and BENCHMARKS.md cite the specification as ``SPEC §n`` / ``§n.m`` (ranges ``§2–§3``, ``§1–3``;
named parts ``§6 "Cost model"``; routes ``§6, route 3``). Every such citation must land on a numbered heading of
docs/spec.md, and the README must link the document.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"

HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+(.+?)\s*$", re.MULTILINE)
NUM = r"(\d+(?:\.\d+)*)"
CITE = re.compile(r"§\s*" + NUM)
RANGE = re.compile(r"§\s*" + NUM + r"\s*[–—-]\s*§?\s*" + NUM)
NAMED = re.compile(r"§\s*" + NUM + r"\s+\"([^\"]+)\"")
ROUTE = re.compile(r"§\s*" + NUM + r",?\s+route\s+(\d+)", re.IGNORECASE)
README_LINK = re.compile(r"\]\((?:\./)?docs/spec\.md(?:#[^)]*)?\)")


def headings(text: str) -> dict[str, str]:
    """Section number -> heading title, for every numbered heading (``## 3. Title``, ``### 3.1 Title``)."""
    found: dict[str, str] = {}
    for num, title in HEADING.findall(text):
        assert num not in found, f"docs/spec.md numbers two headings {num}: {found[num]!r} and {title!r}"
        found[num] = title
    return found


def cited_files(root: Path = ROOT) -> list[Path]:
    """Every file whose citations must resolve: the package's sources, the README, BENCHMARKS.md, the examples,
    the docs (docs/spec.md's own cross-references included) and the tests (this file aside)."""
    files = [root / "README.md", root / "BENCHMARKS.md"]
    files += sorted(p for p in (root / "src").rglob("*.py") if ".egg-info" not in str(p))
    files += sorted((root / "examples").rglob("*.py"))
    files += sorted((root / "docs").rglob("*.md"))
    files += sorted(p for p in (root / "tests").rglob("*.py") if p.name != Path(__file__).name)
    return [p for p in files if p.is_file()]


def _under(num: str, section: str) -> bool:
    return num == section or num.startswith(section + ".")


def unresolved(text: str, sections: dict[str, str]) -> list[str]:
    """The citations in ``text`` that name no heading of the specification (empty: all resolve)."""
    bad: list[str] = []
    for m in CITE.finditer(text):
        if m.group(1) not in sections:
            bad.append(f"§{m.group(1)}")
    for m in RANGE.finditer(text):
        lo, hi = m.group(1), m.group(2)
        if lo.isdigit() and hi.isdigit():  # §1–3: every top-level section in between
            bad += [f"§{n} (in {m.group(0)})" for n in range(int(lo), int(hi) + 1) if str(n) not in sections]
        elif hi not in sections:
            bad.append(f"§{hi} (in {m.group(0)})")
    for m in NAMED.finditer(text):
        sec, name = m.group(1), m.group(2).lower()
        if not any(_under(n, sec) and name in t.lower() for n, t in sections.items()):
            bad.append(f'§{sec} "{m.group(2)}" (no heading under §{sec} names it)')
    for m in ROUTE.finditer(text):
        sec, k = m.group(1), m.group(2)
        if not any(_under(n, sec) and re.match(rf"route\s+{k}\b", t, re.IGNORECASE) for n, t in sections.items()):
            bad.append(f"§{sec} route {k} (no heading under §{sec} is 'Route {k}')")
    return bad


def test_every_cited_section_of_the_spec_exists() -> None:
    sections = headings(SPEC.read_text(encoding="utf-8"))
    problems: list[str] = []
    count = 0
    for path in cited_files():
        text = path.read_text(encoding="utf-8")
        count += len(CITE.findall(text))
        problems += [f"{path.relative_to(ROOT)}: {c}" for c in unresolved(text, sections)]
    assert count >= 100, f"only {count} citations found: is the scan looking in the right places?"
    assert not problems, "citations of sections missing from docs/spec.md:\n" + "\n".join(problems)


def test_the_spec_has_the_sections_the_code_is_built_on() -> None:
    sections = headings(SPEC.read_text(encoding="utf-8"))
    for num in ("1", "2", "3", "3.1", "3.2", "3.3", "3.4", "4", "5", "6", "6.1", "6.2", "6.3", "6.4", "7", "8", "9",
                "10"):
        assert num in sections, f"docs/spec.md has no section {num}"
    # the named parts the code cites, and the routes by number
    assert "agreeing on the codebook" in sections["6.5"].lower()
    assert sections["6.6"].lower().startswith("cost model")
    assert sections["7.3"].lower().startswith("bits per coordinate")
    for k in (1, 2, 3, 4):
        assert sections[f"6.{k}"].lower().startswith(f"route {k}")


def test_the_checker_catches_a_missing_section() -> None:
    sections = {"1": "Notation", "6": "Aggregation", "6.1": "Route 1: summable", "6.5": "Agreeing on the codebook"}
    assert unresolved('SPEC §1, §6.1, §6 "Agreeing on the codebook", §6, route 1', sections) == []
    assert unresolved("SPEC §6.2", sections) == ["§6.2"]
    assert unresolved("SPEC §1–3", sections) == ["§2 (in §1–3)", "§3 (in §1–3)"]
    assert unresolved('SPEC §6 "Cost model"', sections) == ['§6 "Cost model" (no heading under §6 names it)']
    assert unresolved("SPEC §6, route 3", sections) == ["§6 route 3 (no heading under §6 is 'Route 3')"]


def test_the_readme_links_the_spec() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_LINK.search(readme), "README.md must link docs/spec.md"
    assert "SPEC.md" not in readme, "README.md points at SPEC.md, which is not in the repository: link docs/spec.md"
