"""guard: the network each fingerprint was last seen on

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A farm that comes back to its own network changed too much to share a band
with what it was is found through that network: the identity book keeps the
last few fingerprints seen on each. Sightings are kept for a week, so a
restart knew the network of no fingerprint seen longer ago, and a farm back
after three weeks was no longer found. Rows written before this say ''
(no network). Adding a column with a constant default rewrites no rows on
PostgreSQL 11 and later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("guard_fingerprints") as batch:
        batch.add_column(
            sa.Column("last_network", sa.String(length=16), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("guard_fingerprints") as batch:
        batch.drop_column("last_network")
