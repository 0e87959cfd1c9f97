"""guard: the identity book's record (fingerprints, links, sightings, farmed
identities) and the network of each counted entry

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

The per-component sketches of guard_identities were never read; the book
keeps fingerprints in guard_fingerprints instead.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("guard_identities")
    with op.batch_alter_table("guard_entries") as batch:
        batch.add_column(
            sa.Column("network", sa.String(length=16), server_default="", nullable=False)
        )
    op.create_table(
        "guard_fingerprints",
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("digests", sa.JSON(), nullable=False),
        sa.Column("first_seen_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_guard_fingerprints")),
    )
    op.create_table(
        "guard_fingerprint_links",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=32), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("changed", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=512), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guard_fingerprint_links")),
    )
    op.create_index("ix_guard_fingerprint_links_time", "guard_fingerprint_links", ["create_time"])
    op.create_table(
        "guard_sightings",
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("network", sa.String(length=16), nullable=False),
        sa.Column("hour", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", "network", "hour", name=op.f("pk_guard_sightings")),
    )
    op.create_index("ix_guard_sightings_hour", "guard_sightings", ["hour"])
    op.create_table(
        "guard_farmed",
        sa.Column("service_id", sa.String(length=63), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("room_id", sa.String(length=128), nullable=False),
        sa.Column("identity", sa.String(length=32), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "service_id", "action", "room_id", "identity", name=op.f("pk_guard_farmed")
        ),
    )


def downgrade() -> None:
    op.drop_table("guard_farmed")
    op.drop_index("ix_guard_sightings_hour", table_name="guard_sightings")
    op.drop_table("guard_sightings")
    op.drop_index("ix_guard_fingerprint_links_time", table_name="guard_fingerprint_links")
    op.drop_table("guard_fingerprint_links")
    op.drop_table("guard_fingerprints")
    with op.batch_alter_table("guard_entries") as batch:
        batch.drop_column("network")
    op.create_table(
        "guard_identities",
        sa.Column("identity", sa.String(length=32), nullable=False),
        sa.Column("sketch", sa.JSON(), nullable=False),
        sa.Column("first_seen_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("identity", name=op.f("pk_guard_identities")),
    )
