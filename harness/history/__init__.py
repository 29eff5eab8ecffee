"""`harness history`: an index over many result files (see store.py and docs/REPORTS.md)."""
