"""QC flags on jobs, phantom QA rules and sessions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("qc_flags", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("qa_rule", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("qa_session_id", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_qa_session_id", "jobs", ["qa_session_id"])
    op.create_index("ix_jobs_received_at", "jobs", ["received_at"])
    op.create_table(
        "qa_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("detector_serial", sa.String(255), nullable=True),
        sa.Column("station_name", sa.String(255), nullable=True),
        sa.Column("first_image_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_image_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("qa_sessions")
    op.drop_index("ix_jobs_received_at", table_name="jobs")
    op.drop_index("ix_jobs_qa_session_id", table_name="jobs")
    op.drop_column("jobs", "qa_session_id")
    op.drop_column("jobs", "qa_rule")
    op.drop_column("jobs", "qc_flags")
