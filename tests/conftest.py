"""Shared fixtures: a fresh PostgreSQL database, a Redis database, a Redis
Cluster, and a real Tether server listening on a free port.

PostgreSQL, Redis and the Redis Cluster must be running (`make test` starts
them through scripts/ensure-services when they are installed but down). A
test that needs them fails when they are down; nothing here skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from tests.support import RunningServer, start_server
from tether.server.counters.connection import cluster_address

POSTGRES_ADMIN_DSN = os.environ.get(
    "TETHER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_BASE_URL = os.environ.get("TETHER_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# scripts/redis-cluster's; a cluster has no numbered databases, so tests on
# it keep apart by their own services, credentials and devices (every key
# names one of them).
REDIS_CLUSTER_URL = os.environ.get(
    "TETHER_TEST_REDIS_CLUSTER_URL", "redis+cluster://127.0.0.1:7101"
)
# How long the session's leftover tasks get to end once cancelled.
LEFTOVER_SECONDS = 30.0
# Test servers serve the guard's web side on a free port, never on 8080.
os.environ.setdefault("TETHER_HTTP_LISTEN", "127.0.0.1:0")


async def create_database() -> tuple[str, str]:
    """A new, empty database; returns (name, SQLAlchemy URL)."""
    name = f"tether_test_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session", autouse=True)
async def _no_task_outlives_the_session() -> AsyncIterator[None]:
    """Set up before every other session fixture, so it ends after them:
    the tasks still running once every server has stopped are cancelled
    here, and one that will not end fails the session by name and stack
    (the event loop's own close would wait for it without end)."""
    yield
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not current]
    for task in left:
        task.cancel()
    if not left:
        return
    _, pending = await asyncio.wait(left, timeout=LEFTOVER_SECONDS)
    if pending:
        stacks = []
        for task in pending:
            out = io.StringIO()
            task.print_stack(file=out)
            stacks.append(out.getvalue())
        pytest.fail("tasks that would not end when cancelled:\n" + "\n".join(stacks))


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    name, url = await create_database()
    yield url
    await drop_database(name)


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    """A Redis database of its own (1-15), so parallel test runs do not meet."""
    async with claimed_redis_database() as url:
        yield url


@pytest.fixture(scope="session")
async def redis_cluster_url() -> str:
    """The shared local Redis Cluster's URL, once it says cluster_state:ok."""
    address = cluster_address(REDIS_CLUSTER_URL)
    assert address is not None, f"TETHER_TEST_REDIS_CLUSTER_URL={REDIS_CLUSTER_URL}: not a cluster"
    host, port = address.nodes[0]
    client = redis.Redis(host=host, port=port)
    try:
        info = await client.cluster("INFO")
    except (redis.ConnectionError, OSError) as exc:
        raise RuntimeError(
            f"no Redis Cluster at {host}:{port}: run scripts/ensure-services"
        ) from exc
    finally:
        await client.aclose()
    assert info.get("cluster_state") == "ok", f"the Redis Cluster at {host}:{port}: {info}"
    return REDIS_CLUSTER_URL


@contextlib.asynccontextmanager
async def claimed_redis_database(besides: str = "") -> AsyncIterator[str]:
    """An empty Redis database (1-15), claimed with a marker key; flushed after.
    besides: a URL from here that is in use (and may still be empty)."""
    for _ in range(30):
        db = secrets.randbelow(15) + 1
        if besides == f"{REDIS_BASE_URL}/{db}":
            continue
        client = redis.Redis.from_url(f"{REDIS_BASE_URL}/{db}")
        try:
            claimed = await client.set("tether:test:claim", "1", nx=True, ex=3600)
            if claimed and await client.dbsize() == 1:
                await client.delete("tether:test:claim")
                yield f"{REDIS_BASE_URL}/{db}"
                await client.flushdb()
                return
            if claimed:
                await client.delete("tether:test:claim")
        finally:
            await client.aclose()
    raise RuntimeError("no empty Redis database among 1-15")


@pytest.fixture(scope="session")
async def pg_server(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """The server on PostgreSQL and real Redis: what production runs."""
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("pg-server"),
    )
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def sqlite_server(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """The server on SQLite (the embedded default) and real Redis."""
    data_dir: Path = tmp_path_factory.mktemp("sqlite-server")
    server = await start_server(
        database_url=f"sqlite+aiosqlite:///{data_dir / 'tether.db'}",
        redis_url=redis_url,
        data_dir=data_dir,
    )
    yield server
    await server.stop()


@pytest.fixture(params=["postgres", "sqlite"])
def any_server(request: pytest.FixtureRequest) -> RunningServer:
    """Runs a test once on each supported database. (Sync: an async fixture
    cannot ask pytest-asyncio for other async fixtures.)"""
    fixture = "pg_server" if request.param == "postgres" else "sqlite_server"
    server: RunningServer = request.getfixturevalue(fixture)
    return server
