"""provisioning tables

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "entitlement_events",
        sa.Column("device_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("binding_id", sa.Uuid(), nullable=False),
        sa.Column("partner_id", sa.String(length=63), nullable=False),
        sa.Column("service_id", sa.String(length=63), nullable=False),
        sa.Column("account_kind", sa.String(length=16), nullable=False),
        sa.Column("account_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_digest", "position", name=op.f("pk_entitlement_events")),
    )
    op.create_table(
        "entitlement_feeds",
        sa.Column("device_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_digest", name=op.f("pk_entitlement_feeds")),
    )
    op.create_table(
        "provisioning_instructions",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instruction_id", sa.Uuid(), nullable=False),
        sa.Column("partner_id", sa.String(length=63), nullable=False),
        sa.Column("service_id", sa.String(length=63), nullable=False),
        sa.Column("binding_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("partner_reference", sa.String(length=128), nullable=False),
        sa.Column("account_kind", sa.String(length=16), nullable=False),
        sa.Column("account_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=False),
        sa.Column("partner_service_reference", sa.String(length=128), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["partner_id"],
            ["partners.partner_id"],
            name=op.f("fk_provisioning_instructions_partner_id_partners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_provisioning_instructions")),
        sa.UniqueConstraint(
            "instruction_id", name=op.f("uq_provisioning_instructions_instruction_id")
        ),
    )
    with op.batch_alter_table("provisioning_instructions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_provisioning_instructions_binding_id", ["binding_id"], unique=False
        )
        batch_op.create_index(
            "ix_provisioning_instructions_deliverable",
            ["partner_id", "seq"],
            unique=False,
            postgresql_where=sa.text("state IN ('pending', 'leased')"),
            sqlite_where=sa.text("state IN ('pending', 'leased')"),
        )
        batch_op.create_index(
            "ix_provisioning_instructions_partner_state", ["partner_id", "state"], unique=False
        )

    op.create_table(
        "usage_records",
        sa.Column(
            "record_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("partner_id", sa.String(length=63), nullable=False),
        sa.Column("service_id", sa.String(length=63), nullable=False),
        sa.Column("binding_id", sa.Uuid(), nullable=False),
        sa.Column("account_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("device_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("metric", sa.String(length=63), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("occur_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.ForeignKeyConstraint(
            ["partner_id"],
            ["partners.partner_id"],
            name=op.f("fk_usage_records_partner_id_partners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("record_id", name=op.f("pk_usage_records")),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index("ix_usage_records_binding_id", ["binding_id"], unique=False)
        batch_op.create_index("ix_usage_records_device_day", ["device_digest", "day"], unique=False)
        batch_op.create_index("ix_usage_records_partner_day", ["partner_id", "day"], unique=False)

    op.create_table(
        "entitlements",
        sa.Column("binding_id", sa.Uuid(), nullable=False),
        sa.Column("service_id", sa.String(length=63), nullable=False),
        sa.Column("partner_id", sa.String(length=63), nullable=False),
        sa.Column("account_kind", sa.String(length=16), nullable=False),
        sa.Column("account_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("device_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["binding_id"],
            ["bindings.binding_id"],
            name=op.f("fk_entitlements_binding_id_bindings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("binding_id", "service_id", name=op.f("pk_entitlements")),
    )
    with op.batch_alter_table("entitlements", schema=None) as batch_op:
        batch_op.create_index(
            "ix_entitlements_lookup", ["partner_id", "service_id", "account_digest"], unique=False
        )

    op.create_table(
        "usage_answers",
        sa.Column("binding_id", sa.Uuid(), nullable=False),
        sa.Column("service_id", sa.String(length=63), nullable=False),
        sa.Column("figures", sa.Text(), nullable=False),
        sa.Column("period", sa.String(length=100), nullable=False),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["binding_id"],
            ["bindings.binding_id"],
            name=op.f("fk_usage_answers_binding_id_bindings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("binding_id", "service_id", name=op.f("pk_usage_answers")),
    )


def downgrade() -> None:
    op.drop_table("usage_answers")
    with op.batch_alter_table("entitlements", schema=None) as batch_op:
        batch_op.drop_index("ix_entitlements_lookup")

    op.drop_table("entitlements")
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_records_partner_day")
        batch_op.drop_index("ix_usage_records_device_day")
        batch_op.drop_index("ix_usage_records_binding_id")

    op.drop_table("usage_records")
    with op.batch_alter_table("provisioning_instructions", schema=None) as batch_op:
        batch_op.drop_index("ix_provisioning_instructions_partner_state")
        batch_op.drop_index(
            "ix_provisioning_instructions_deliverable",
            postgresql_where=sa.text("state IN ('pending', 'leased')"),
            sqlite_where=sa.text("state IN ('pending', 'leased')"),
        )
        batch_op.drop_index("ix_provisioning_instructions_binding_id")

    op.drop_table("provisioning_instructions")
    op.drop_table("entitlement_feeds")
    op.drop_table("entitlement_events")
