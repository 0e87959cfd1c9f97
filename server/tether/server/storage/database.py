"""The async engine and sessions, for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
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

# PostgreSQL refusing or dropping connections (too many clients, starting
# up, shutting down), as the raw asyncpg fast paths raise it: an outage to
# retry, not a bug.
CONNECTION_OUTAGES: tuple[type[Exception], ...] = (
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
)


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
        self._pool_size = pool_size
        # See driver_transaction; opened on first use.
        self._driver_pool: Any = None
        self._driver_pool_lock = asyncio.Lock()
        # asyncpg query loggers put on every PostgreSQL connection opened
        # from now on (observe_queries).
        self._query_loggers: list[Callable[[Any], None]] = []
        # Told how long each use of a connection held it (observe_connections).
        self._hold_observer: Callable[[float], None] | None = None

    def observe_connections(self, observer: Callable[[float], None]) -> None:
        """Has observer told, in seconds, how long each use of a PostgreSQL
        connection held it (a session's or a driver connection's): one
        timing per use rather than per statement, which asyncpg's query
        loggers cost (~15 us each). Call it before the first use."""
        if is_sqlite(self.url):
            return
        self._hold_observer = observer

        @event.listens_for(self.engine.sync_engine, "checkout")
        def _held(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
            record.info["held_since"] = time.perf_counter()

        @event.listens_for(self.engine.sync_engine, "checkin")
        def _released(_dbapi_connection: Any, record: Any) -> None:
            since = record.info.pop("held_since", None)
            if since is not None:
                observer(time.perf_counter() - since)

    def observe_queries(self, logger: Callable[[Any], None]) -> None:
        """Has asyncpg call logger (with a LoggedQuery: statement, elapsed
        seconds, exception) after every statement on the connections opened
        from now on, the engine's and the driver pool's (PostgreSQL only;
        call it before the first use). Without one, asyncpg times nothing;
        with one, each statement costs ~15 us more."""
        if is_sqlite(self.url):
            return
        if not self._query_loggers:

            @event.listens_for(self.engine.sync_engine, "connect")
            def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                for each in self._query_loggers:
                    dbapi_connection.driver_connection.add_query_logger(each)

        self._query_loggers.append(logger)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def driver_transaction(self) -> AsyncIterator[Any]:
        """A transaction on a bare asyncpg connection (PostgreSQL only).

        For the hottest calls: SQLAlchemy's execution layers and the
        greenlet bridge under each of its awaits cost more CPU than a
        prepared statement's own round trip. The connections come from a
        pool of their own, of up to pool_size connections, kept open: the
        engine's pool closes its overflow connections as they come back,
        and a new connection costs a PostgreSQL backend and every
        statement prepared again. Committed on success, rolled back on
        error; a lost database raises Unavailable (the pool replaces the
        connection).
        """
        async with self.driver_connection() as raw, raw.transaction():
            yield raw

    @asynccontextmanager
    async def driver_connection(self) -> AsyncIterator[Any]:
        """A bare asyncpg connection of driver_transaction's pool, outside a
        transaction: each statement on it commits on its own, which saves
        the BEGIN and COMMIT round trips of a one-statement change. A lost
        database raises Unavailable (the pool replaces the connection)."""
        pool = self._driver_pool or await self._open_driver_pool()
        observe = self._hold_observer
        try:
            async with pool.acquire() as raw:
                if observe is None:
                    yield raw
                else:
                    since = time.perf_counter()
                    try:
                        yield raw
                    finally:
                        observe(time.perf_counter() - since)
        except BaseException as exc:
            if isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
                raise errors.Unavailable(
                    ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                    f"the database did not answer: {exc}",
                ) from exc
            raise

    async def _open_driver_pool(self) -> Any:
        async with self._driver_pool_lock:
            if self._driver_pool is None:
                _, options = self.engine.dialect.create_connect_args(self.engine.url)
                self._driver_pool = await asyncpg.create_pool(
                    min_size=0,
                    max_size=self._pool_size,
                    # Every user ends its transaction and changes no session
                    # state: the default reset would cost a round trip.
                    reset=_keep_session,
                    init=self._init_driver_connection if self._query_loggers else None,
                    **options,
                )
        return self._driver_pool

    async def _init_driver_connection(self, connection: Any) -> None:
        for logger in self._query_loggers:
            connection.add_query_logger(logger)

    async def close(self) -> None:
        if self._driver_pool is not None:
            await self._driver_pool.close()
            self._driver_pool = None
        await self.engine.dispose()


async def _keep_session(_connection: Any) -> None:
    pass
