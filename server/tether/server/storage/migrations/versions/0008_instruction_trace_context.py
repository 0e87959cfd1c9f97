"""provisioning: the trace context of the call that wrote each instruction

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

An instruction's delivery, often much later and on another stream or
replica, links its span to the report (or unbind) that wrote it; "" when
that call was not traced.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
# Comes after 0007 once both are merged; until then it follows 0006.
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("provisioning_instructions") as batch:
        batch.add_column(
            sa.Column("trace_parent", sa.String(length=55), server_default="", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("provisioning_instructions") as batch:
        batch.drop_column("trace_parent")
