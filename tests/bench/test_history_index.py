"""`harness history index` of 1,000 result files into a fresh SQLite database.

The files are derived from one real traced result (the micro-kvm suite under
real KVM, run at the start of this module; see tests/integration/history_files.py).
Goal: under 10 s on this machine, read from the saved benchmark (extra_info),
not asserted as a timing. What is asserted: every file indexed once, a second
pass adds nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.history import store
from harness.paths import SUITES_DIR
from tests.integration.reports.history_files import derive

pytestmark = pytest.mark.integration

FILES = 1000


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("history-real")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(SUITES_DIR / "micro-kvm.toml"),
         "--results-dir", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (real,) = out.glob("*.json")
    derived = tmp_path_factory.mktemp("history-files")
    derive(real, derived, FILES)
    return derived


def test_index_1000_files_sqlite(benchmark: BenchmarkFixture, files: Path,
                                 tmp_path: Path) -> None:
    dbs = iter(range(100))

    def fresh() -> tuple[tuple[object, ...], dict[str, object]]:
        engine = store.connect(f"sqlite:///{tmp_path / f'h{next(dbs)}.sqlite'}")
        return (engine, [files]), {}

    start = time.perf_counter()
    outcome = benchmark.pedantic(store.index, setup=fresh, rounds=3, iterations=1)
    wall = time.perf_counter() - start
    assert len(outcome.added) == FILES and not outcome.problems
    engine = store.connect(f"sqlite:///{tmp_path / 'h0.sqlite'}")
    again = store.index(engine, [files])
    assert again.added == [] and again.already == FILES
    with engine.connect() as conn:
        rows = conn.execute(store.sa.select(store.sa.func.count())
                            .select_from(store.figures)).scalar_one()
    benchmark.extra_info.update(
        files=FILES, figure_rows=rows, goal_s=10.0,
        seconds_per_round=round(wall / 3, 3),
        note="fresh SQLite database per round, WAL, batches of 50 files per transaction",
    )
