"""The first schema: one row per indexed result file, one per figure of it.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def upgrade() -> None:
    """Create the runs and figures tables."""
    op.create_table(
        "runs",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(80), nullable=False),
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("suite", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("kernel", sa.String(255), nullable=False),
        sa.Column("host_class", sa.String(400), nullable=False),
        sa.Column("accelerator", sa.String(32), nullable=False),
        sa.Column("shard", sa.String(16), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "file_sha256", name="uq_runs_run_file"),
    )
    op.create_index("ix_runs_suite_started", "runs", ["suite", "started_at"])
    op.create_table(
        "figures",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("run_pk", _ID, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("workload", sa.String(200), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("vm", sa.String(200), nullable=False),
        sa.Column("phase", sa.String(200), nullable=False),
        sa.Column("repetition", sa.Integer(), nullable=False),
        sa.Column("figure", sa.String(300), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(40), nullable=False),
    )
    op.create_index("ix_figures_run", "figures", ["run_pk"])
    op.create_index("ix_figures_figure", "figures", ["figure"])


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("figures")
    op.drop_table("runs")
