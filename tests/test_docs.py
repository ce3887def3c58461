"""The project's own docs stay true: citations of the spec name its sections, and the
files the architecture guide names exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("filtering/**/*.py"), *REPO.glob("pipelines/**/*.py")])


def test_spec_citations_name_sections_of_docs_spec():
    headings = [
        line.lstrip("#").strip()
        for line in (REPO / "docs" / "spec.md").read_text().splitlines()
        if line.startswith("#")
    ]
    bad = []
    for path in SOURCES:
        text = path.read_text()
        if re.search(r"\bSPEC\b", text):
            bad.append(f"{path.relative_to(REPO)}: cites SPEC; cite docs/spec.md and a section")
        for section in re.findall(r'docs/spec\.md, "([^"]+)"', text):
            if not any(h.startswith(section) for h in headings):
                bad.append(f"{path.relative_to(REPO)}: no section {section!r} in docs/spec.md")
    assert bad == []


def test_files_named_by_the_developer_docs_exist():
    """The README, the docs pages and CONTRIBUTING.md name files (tests that back a claim,
    modules a change touches); a moved file must move its mention too."""
    missing = []
    docs = ("README.md", "CONTRIBUTING.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md")))
    for doc in docs:
        text = (REPO / doc).read_text()
        for path in re.findall(r"`((?:filtering|pipelines|tests|bench|configs|docs|sample_data)/[^`\s:]*)", text):
            if "<" in path or "*" in path or "..." in path:
                continue  # a pattern (``filtering/filters/<name>.py``), not a file
            if not (REPO / path.rstrip("/")).exists():
                missing.append(f"{doc}: {path}")
    assert missing == []
