"""No restart loosens a limit: an embedded server (fakeredis in the process)
and a PostgreSQL + Redis server whose Redis was flushed both find the same
browser at its count after a restart, restored from SQL at start."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as redis

from tests.conftest import claimed_redis_database
from tests.guard_support import fingerprint, guard_client, new_service
from tests.support import start_server
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.shared import digests

IP = "203.0.113.40"


async def _restart_keeps_the_count(database_url: str, redis_url: str, data_dir: Path) -> None:
    settings = {"digest_keys": digests.new_key_spec("restart")}
    browser = fingerprint("restart")
    server = await start_server(
        database_url=database_url, redis_url=redis_url, data_dir=data_dir, **settings
    )
    try:
        guard = await guard_client(server)
        service = await new_service(guard, register_limit=2)
        first = await guard.evaluate(service, "register", account("r1"), browser, IP)
        assert first.count == 1
    finally:
        await server.stop()
    if redis_url:
        client = redis.Redis.from_url(redis_url)
        try:
            await client.flushdb()  # Redis lost everything while Tether was down
        finally:
            await client.aclose()

    server = await start_server(
        database_url=database_url, redis_url=redis_url, data_dir=data_dir, **settings
    )
    try:
        guard = await guard_client(server)
        second = await guard.evaluate(service, "register", account("r2"), browser, IP)
        assert (second.verdict, second.count) == (pb.VERDICT_ALLOW, 2)
        third = await guard.evaluate(service, "register", account("r3"), browser, IP)
        assert (third.verdict, third.reason) == (pb.VERDICT_DENY, pb.VERDICT_REASON_REGISTER_LIMIT)
    finally:
        await server.stop()


async def test_an_embedded_restart_keeps_the_count(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    await _restart_keeps_the_count(f"sqlite+aiosqlite:///{data / 'tether.db'}", "", data)


async def test_a_restart_on_a_flushed_redis_keeps_the_count(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    # A Redis database of its own: the session's servers on the shared one
    # (the SQLite server among them, another deployment) would notice the
    # flush and restore their own entries, and calls meanwhile get the fail
    # mode, as they should; here only this deployment's restore is tested.
    async with claimed_redis_database(besides=redis_url) as own_redis:
        await _restart_keeps_the_count(postgres_url, own_redis, tmp_path / "data")
