"""The INSERT construct with ON CONFLICT for the session's database.

PostgreSQL and SQLite spell upserts the same way; SQLAlchemy just keeps the
two constructs apart.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert(session: AsyncSession, table: Any) -> Any:
    """postgresql.insert or sqlite.insert, whichever fits the session."""
    return insert_for(session.get_bind().dialect.name, table)


def insert_for(dialect_name: str, table: Any) -> Any:
    """postgresql.insert or sqlite.insert, by dialect name."""
    if dialect_name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
