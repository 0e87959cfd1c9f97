"""The async engine and sessions, for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, pool_size: int = 20) -> AsyncEngine:
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
    _ping_idle_connections(engine)
    return engine


# A connection handed back this recently was working then; older ones are
# checked before use (a database restart takes longer than this).
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """pool_pre_ping, for connections that sat idle only.

    pool_pre_ping checks every checkout, which on asyncpg costs three round
    trips (BEGIN, a ping, ROLLBACK): more than a busy call's own work. A
    connection that fails the check is replaced, as with pool_pre_ping.
    """

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["checkin_time"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("checkin_time")
        if returned is not None and time.monotonic() - returned < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise DisconnectionError("connection failed its check") from exc


def _configure_sqlite(engine: AsyncEngine) -> None:
    # SQLite's default deferred transactions deadlock when two writers both
    # upgrade from a read; BEGIN IMMEDIATE makes writers queue instead, and
    # busy_timeout makes them wait rather than fail.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the engine; hands out sessions and transactions."""

    def __init__(self, url: str, pool_size: int = 20) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def driver_transaction(self) -> AsyncIterator[Any]:
        """A transaction on the bare asyncpg connection of one of the
        engine's pooled connections (PostgreSQL only).

        For the hottest calls: SQLAlchemy's execution layers and the
        greenlet bridge under each of its awaits cost more CPU than a
        prepared statement's own round trip. Committed on success, rolled
        back on error; a connection that cannot be rolled back, or that
        failed, is dropped from the pool. A lost database raises
        Unavailable.
        """
        async with self.engine.connect() as held:
            raw: Any = (await held.get_raw_connection()).driver_connection
            try:
                transaction = raw.transaction()
                await transaction.start()
                try:
                    yield raw
                except BaseException:
                    # A rollback that fails leaves the connection in its
                    # transaction (or closed): dropped below.
                    with contextlib.suppress(Exception):
                        await transaction.rollback()
                    raise
                await transaction.commit()
            except BaseException as exc:
                if raw.is_closed() or raw.is_in_transaction() or _is_outage(exc):
                    await held.invalidate()
                if _is_outage(exc):
                    raise errors.Unavailable(
                        ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                        f"the database did not answer: {exc}",
                    ) from exc
                raise

    async def close(self) -> None:
        await self.engine.dispose()


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError)
