"""Storage commitment of deliveries.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("commitment_uid", sa.String(64), nullable=True))
    op.add_column("deliveries", sa.Column("commit_by", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_deliveries_commitment_uid", "deliveries", ["commitment_uid"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_commitment_uid", table_name="deliveries")
    op.drop_column("deliveries", "commit_by")
    op.drop_column("deliveries", "commitment_uid")
