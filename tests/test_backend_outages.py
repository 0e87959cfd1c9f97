"""What counts as a backing store's outage (UNAVAILABLE, retry) rather than
a bug (INTERNAL): PostgreSQL refusing or dropping connections, whether the
raw asyncpg fast paths or SQLAlchemy raise it."""

from __future__ import annotations

import asyncpg
import pytest
from asyncpg import exceptions as asyncpg_errors
from sqlalchemy.exc import DBAPIError

from tether.server.transport.interceptor import _is_backend_outage


async def test_too_many_clients_from_a_real_postgresql_is_an_outage(postgres_url: str) -> None:
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE ROLE tether_outage_probe LOGIN CONNECTION LIMIT 0")
    except asyncpg_errors.DuplicateObjectError:
        pass
    finally:
        await conn.close()
    # A role allowed no connection meets what a full server answers: 53300.
    with pytest.raises(asyncpg_errors.TooManyConnectionsError) as refused:
        await asyncpg.connect(dsn.replace("postgres@", "tether_outage_probe@"))
    assert _is_backend_outage(refused.value)
    wrapped = DBAPIError("SELECT 1", None, refused.value)
    assert _is_backend_outage(wrapped)


def test_a_query_error_is_no_outage() -> None:
    assert not _is_backend_outage(asyncpg_errors.UniqueViolationError("duplicate"))
    assert not _is_backend_outage(DBAPIError("SELECT 1", None, ValueError("bad")))
    assert _is_backend_outage(asyncpg_errors.ConnectionDoesNotExistError("closed"))
