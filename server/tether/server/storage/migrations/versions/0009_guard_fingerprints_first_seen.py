"""guard: an index on guard_fingerprints.first_seen_time

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

Every process's book follower reads the fingerprints first seen since its
last read, twice a second; without the index each read scanned the table.
A plain CREATE INDEX holds the table's writes while it builds: on a large
table, build it first with CREATE INDEX CONCURRENTLY under this name, and
this migration leaves it be.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_guard_fingerprints_first_seen_time",
        "guard_fingerprints",
        ["first_seen_time"],
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index(
        "ix_guard_fingerprints_first_seen_time", table_name="guard_fingerprints", if_exists=True
    )
