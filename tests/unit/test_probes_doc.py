"""docs/PROBES.md's version table names exactly the catalogue's function probes."""

from __future__ import annotations

import re

from harness.paths import PROJECT_ROOT
from harness.trace import probes as P

DOC = PROJECT_ROOT / "docs" / "PROBES.md"


def doc_table_probes(text: str) -> list[str]:
    """The backticked names in the first column of the table headed "catalogue probe"."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| catalogue probe |"))
    names: list[str] = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first = line.split("|")[1]
        m = re.fullmatch(r"\s*`([A-Za-z0-9_]+)`\s*", first)
        assert m, f"{DOC}: first cell {first!r} is not one `function_name`"
        names.append(m.group(1))
    return names


def test_doc_table_and_catalogue_name_the_same_functions() -> None:
    in_doc = doc_table_probes(DOC.read_text())
    functions = [p.name for p in P.CATALOGUE if p.kind != "tracepoint"]
    assert len(in_doc) == len(set(in_doc)), "a function is listed twice in docs/PROBES.md"
    assert set(in_doc) - set(functions) == set(), "in docs/PROBES.md but not in the catalogue"
    assert set(functions) - set(in_doc) == set(), "in the catalogue but not in docs/PROBES.md"


def test_every_row_has_a_cell_per_kernel_version() -> None:
    lines = DOC.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| catalogue probe |"))
    width = header.count("|")
    rows = [line for line in lines if line.startswith("| `")]
    assert rows and all(row.count("|") == width for row in rows)
