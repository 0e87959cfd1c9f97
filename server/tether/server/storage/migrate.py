"""Applies the Alembic migrations shipped inside the package."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    # env.py runs its own event loop, so it must not share ours.
    await asyncio.to_thread(upgrade, database_url, revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def upgrade_reporting(database_url: str) -> list[str]:
    """Upgrades to head; returns the migrations it applied ("revision: what"), oldest first."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        before = await current_revision(engine)
        await upgrade_async(database_url)
        after = await current_revision(engine)
    finally:
        await engine.dispose()
    if after is None or after == before:
        return []
    script = ScriptDirectory.from_config(alembic_config(""))
    applied = script.iterate_revisions(after, before or "base")
    return [f"{r.revision}: {' '.join((r.doc or '').split())}" for r in reversed(list(applied))]
