"""Many result files for the history tests, derived from one real result.

Each derived file is the real result with its own run id, a start time one
minute later than the previous, and one of two host names and kernels (so
host filters and per-kernel trends have something to tell apart). Derived,
not measured: the history index only needs many distinct, valid files.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path


def derive(src: Path, out: Path, n: int, *, start: int = 0) -> list[Path]:
    """Write ``n`` derived copies of result ``src`` into ``out``; their paths."""
    data = json.loads(src.read_text())
    t0 = datetime.fromisoformat(data["started_at"])
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        data["run_id"] = f"{json.loads(src.read_text())['run_id']}-d{i:04d}"
        data["started_at"] = (t0 + timedelta(minutes=i)).isoformat()
        data["host"]["hostname"] = "host-a" if i % 2 == 0 else "host-b"
        data["host"]["kernel_release"] = "6.1.0-a" if i < (start + n) // 2 else "6.6.0-b"
        path = out / f"{data['run_id']}.json"
        path.write_text(json.dumps(data))
        paths.append(path)
    return paths
