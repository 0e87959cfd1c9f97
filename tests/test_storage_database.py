"""The engine's connection checks: a connection that died while idle in the
pool is replaced before a call uses it. The fast path's own pool
(driver_transaction): kept connections, rolled back on failure."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import text

from tether.server.storage import database
from tether.server.storage.database import Database


async def _backend_pid(db: Database) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def test_a_connection_killed_while_idle_is_replaced_unseen(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every pooled connection counts as idle long enough to be checked.
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)
    db, admin = Database(postgres_url, pool_size=1), Database(postgres_url, pool_size=1)
    try:
        first = await _backend_pid(db)
        async with admin.engine.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        # The pooled connection is dead; the check replaces it.
        assert await _backend_pid(db) != first
    finally:
        await db.close()
        await admin.close()


async def test_a_connection_just_handed_back_is_reused(postgres_url: str) -> None:
    db = Database(postgres_url, pool_size=1)
    try:
        assert await _backend_pid(db) == await _backend_pid(db)
    finally:
        await db.close()


async def _driver_backend_pid(db: Database) -> int:
    async with db.driver_transaction() as conn:
        return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_the_fast_path_keeps_its_connection(postgres_url: str) -> None:
    db = Database(postgres_url, pool_size=1)
    try:
        assert await _driver_backend_pid(db) == await _driver_backend_pid(db)
    finally:
        await db.close()


async def test_a_fast_path_transaction_that_fails_writes_nothing(postgres_url: str) -> None:
    db = Database(postgres_url, pool_size=1)
    table = f"fast_path_{secrets.token_hex(4)}"
    try:
        async with db.driver_transaction() as conn:
            await conn.execute(f"CREATE TABLE {table} (n int)")
        with pytest.raises(RuntimeError):
            async with db.driver_transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                raise RuntimeError("work failed")
        async with db.driver_transaction() as conn:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            await conn.execute(f"DROP TABLE {table}")
    finally:
        await db.close()
