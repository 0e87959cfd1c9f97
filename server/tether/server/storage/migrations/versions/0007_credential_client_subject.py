"""credentials: the client certificate subject a credential may be bound to

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

A bound credential is accepted only over mutual TLS from a client
certificate with that subject; existing credentials stay unbound (NULL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("client_subject", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("client_subject")
