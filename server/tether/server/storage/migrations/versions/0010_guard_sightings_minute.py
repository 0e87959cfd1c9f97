"""guard: the minute of each recorded sighting

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

The identity book counts an identity's rate in 10-minute slots; a sighting
row kept only its hour, so a restart put every sighting of an hour into one
slot and rebuilt the rates velocity judges bursts against too low for up to
7 days. Rows written before this say minute 30 (the middle of the hour, as
they were read before). Adding a column with a constant default rewrites
no rows on PostgreSQL 11 and later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("guard_sightings") as batch:
        batch.add_column(
            sa.Column("minute", sa.SmallInteger(), nullable=False, server_default="30")
        )


def downgrade() -> None:
    with op.batch_alter_table("guard_sightings") as batch:
        batch.drop_column("minute")
