"""Alembic environment: migrations run on the connection the harness hands in.

There is no alembic.ini: harness.history.store.migrate builds the Config,
takes a lock (PostgreSQL advisory lock, or a file lock beside a SQLite file)
and passes its open connection as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
