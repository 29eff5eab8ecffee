"""Real result files shared by the report, history, nightly and shard tests (made once)."""

from tests.integration.reports.real_results import (
    killed_result,
    micro_results,
    paging_result,
    tcg_result,
)

__all__ = ["killed_result", "micro_results", "paging_result", "tcg_result"]
