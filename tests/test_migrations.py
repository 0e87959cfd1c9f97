"""Migrations and table definitions describe the same schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from tether.server.binding import tables as binding_tables
from tether.server.guard import tables as guard_tables
from tether.server.provisioning import tables as provisioning_tables
from tether.server.shared import partners
from tether.server.storage import idempotency, migrate
from tether.server.storage.base import Base
from tether.server.storage.database import create_engine
from tether.server.storage.schema import compared
from tether.server.transport import credentials

# Every module that defines tables (as the migrations' env.py imports them).
TABLE_MODULES = (
    binding_tables,
    credentials,
    guard_tables,
    idempotency,
    partners,
    provisioning_tables,
)
metadata = Base.metadata


def _differences(connection: Connection) -> list[Any]:
    opts = {"compare_type": True, "include_object": compared(connection.dialect.name)}
    context = MigrationContext.configure(connection, opts=opts)
    return list(compare_metadata(context, metadata))


async def _check(url: str) -> None:
    await migrate.upgrade_async(url)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await engine.dispose()


async def test_migrated_postgres_matches_tables(postgres_url: str) -> None:
    await _check(postgres_url)


async def test_migrated_sqlite_matches_tables(tmp_path: Path) -> None:
    await _check(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
