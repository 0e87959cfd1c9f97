"""Migrations and table definitions describe the same schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from tests.conftest import create_database, drop_database
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


async def test_an_index_built_by_hand_beforehand_is_left_be() -> None:
    # On a large guard_fingerprints table an operator builds 0009's index
    # CONCURRENTLY (writes go on) before upgrading; the migration keeps it.
    name, url = await create_database()
    await migrate.upgrade_async(url, "0008")
    engine = create_engine(url)
    try:
        async with engine.connect() as opened:
            connection = await opened.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(
                text(
                    "CREATE INDEX CONCURRENTLY ix_guard_fingerprints_first_seen_time"
                    " ON guard_fingerprints (first_seen_time)"
                )
            )
    finally:
        await engine.dispose()
    try:
        await _check(url)
    finally:
        await drop_database(name)
