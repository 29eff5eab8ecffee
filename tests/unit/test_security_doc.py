"""docs/SECURITY.md names the tests that show each check: every one of them must exist."""

from __future__ import annotations

import re

from harness.paths import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "SECURITY.md"


def referenced() -> list[tuple[str, str]]:
    """(test file, test name) for every ``path::name`` and ``::name`` after it in the doc."""
    out: list[tuple[str, str]] = []
    for line in DOC.read_text().splitlines():
        current = ""
        for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", line):
            path, name = m.group(1), m.group(2)
            current = path or current
            if current:
                out.append((current, name or ""))
    return out


def test_every_test_the_security_doc_names_exists() -> None:
    refs = referenced()
    assert len(refs) > 40
    missing = []
    for path, name in refs:
        file = PROJECT_ROOT / path
        if not file.is_file():
            missing.append(path)
        elif name and not re.search(rf"^(async )?def {name}\(", file.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/SECURITY.md names tests that do not exist: {missing}"
