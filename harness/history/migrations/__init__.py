"""Alembic migrations of the history index, run by the tool itself (store.migrate)."""
