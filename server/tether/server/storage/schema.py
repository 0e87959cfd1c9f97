"""How Alembic compares the migrated schema with the tables.

The tables register themselves on Base.metadata when their modules are
imported; the migrations' env.py imports every one of them (storage itself
imports no area).
"""

from typing import Any

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
