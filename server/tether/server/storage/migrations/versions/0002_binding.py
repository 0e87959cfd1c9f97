"""binding tables

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bindings",
        sa.Column("binding_id", sa.Uuid(), nullable=False),
        sa.Column("partner_id", sa.String(length=63), nullable=False),
        sa.Column("account_kind", sa.String(length=16), nullable=False),
        sa.Column("account_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("device_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("partner_reference", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoke_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["partner_id"],
            ["partners.partner_id"],
            name=op.f("fk_bindings_partner_id_partners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("binding_id", name=op.f("pk_bindings")),
    )
    with op.batch_alter_table("bindings", schema=None) as batch_op:
        batch_op.create_index("ix_bindings_device_digest", ["device_digest"], unique=False)
        batch_op.create_index(
            "ix_bindings_partner_create_time", ["partner_id", "create_time"], unique=False
        )
        batch_op.create_index(
            "uq_bindings_active_account",
            ["partner_id", "account_digest"],
            unique=True,
            postgresql_where=sa.text("state = 'active'"),
            sqlite_where=sa.text("state = 'active'"),
        )

    op.create_table(
        "eligible_accounts",
        sa.Column(
            "entry_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("partner_id", sa.String(length=63), nullable=False),
        sa.Column("account_kind", sa.String(length=16), nullable=False),
        sa.Column("account_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("partner_reference", sa.String(length=128), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["partner_id"],
            ["partners.partner_id"],
            name=op.f("fk_eligible_accounts_partner_id_partners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_eligible_accounts")),
    )
    with op.batch_alter_table("eligible_accounts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_eligible_accounts_account_digest", ["account_digest"], unique=False
        )
        batch_op.create_index(
            "uq_eligible_accounts_partner_digest", ["partner_id", "account_digest"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("eligible_accounts", schema=None) as batch_op:
        batch_op.drop_index("uq_eligible_accounts_partner_digest")
        batch_op.drop_index("ix_eligible_accounts_account_digest")

    op.drop_table("eligible_accounts")
    with op.batch_alter_table("bindings", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_bindings_active_account",
            postgresql_where=sa.text("state = 'active'"),
            sqlite_where=sa.text("state = 'active'"),
        )
        batch_op.drop_index("ix_bindings_partner_create_time")
        batch_op.drop_index("ix_bindings_device_digest")

    op.drop_table("bindings")
