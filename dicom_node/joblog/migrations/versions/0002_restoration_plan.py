"""The restoration plan of a job: decided by the worker when it claims the job, recorded on it.

The pipeline becomes nullable (the receiver records only the profile; the worker decides the
pipeline, its options and the dose fraction from the profile at claim time), and the options
and dose fraction get columns of their own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("pipeline", existing_type=sa.String(64), nullable=True)
        batch.add_column(sa.Column("restorer_options", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("dose_fraction", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dose_fraction")
        batch.drop_column("restorer_options")
        batch.alter_column("pipeline", existing_type=sa.String(64), nullable=False)
