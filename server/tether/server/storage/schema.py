"""Imports every area's tables so Base.metadata holds the whole schema."""

from typing import Any

from tether.server.admin import tables as admin_tables
from tether.server.binding import tables as binding_tables
from tether.server.guard import tables as guard_tables
from tether.server.provisioning import tables as provisioning_tables
from tether.server.storage.base import Base
from tether.server.transport import idempotency

metadata = Base.metadata

# Foreign keys that PostgreSQL enforces with triggers instead (migration
# 0005): checked per statement rather than per row, they cost a bulk import
# far less. The tables keep them, and SQLite has them as written.
TRIGGER_ENFORCED_ON_POSTGRES = frozenset({"fk_eligible_accounts_partner_id_partners"})


def compared(dialect: str) -> Any:
    """Alembic's include_object for a database of this dialect: the schema
    the migrations make there, compared with the tables."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        return not (
            dialect == "postgresql"
            and type_ == "foreign_key_constraint"
            and name in TRIGGER_ENFORCED_ON_POSTGRES
        )

    return include


__all__ = [
    "admin_tables",
    "binding_tables",
    "compared",
    "guard_tables",
    "idempotency",
    "metadata",
    "provisioning_tables",
]
