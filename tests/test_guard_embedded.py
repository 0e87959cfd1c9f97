"""Embedded mode: the same Lua scripts on the in-process fakeredis."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import start_server
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard.restorer import Restorer

IP = "192.0.2.1"


async def test_embedded_fakeredis_runs_the_same_rules_exactly(tmp_path: Path) -> None:
    server = await start_server(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}",
        redis_url="",
        data_dir=tmp_path,
    )
    try:
        assert server.app.settings.embedded_redis
        guard = await guard_client(server)
        service = await new_service(guard, register_limit=5, login_limit=1)
        verdicts = await asyncio.gather(
            *(
                guard.evaluate(service, "register", account(f"e{i}"), fingerprint("emb"), IP)
                for i in range(200)
            )
        )
        assert sum(v.verdict == pb.VERDICT_ALLOW for v in verdicts) == 5
        login = await guard.evaluate(service, "login", account("e0"), fingerprint("emb"), IP)
        refused = await guard.evaluate(service, "login", account("e1"), fingerprint("emb"), IP)
        assert refused.verdict == pb.VERDICT_DENY
        assert await guard.end_login(service, login.identity, account("e0"))
        renewed = await guard.evaluate(service, "login", account("e1"), fingerprint("emb"), IP)
        assert renewed.verdict == pb.VERDICT_ALLOW
        await guard.renew_login(service, renewed.identity, account("e1"))
        demo = await guard.get_policy(server.app.settings.guard_demo_service)
        assert demo.register_limit > 0
    finally:
        await server.stop()


async def test_the_counters_watch_stops_when_cancelled_during_a_fakeredis_call(
    tmp_path: Path,
) -> None:
    """fakeredis answers at once, and Python 3.11's wait_for then drops a
    cancellation that arrives with the answer: the restorer's watch went on
    checking, and the stop that awaited it (a server's shutdown) waited for
    ever. A watch checking without pause is stopped twenty times, each stop
    landing at another point of its calls."""
    server = await start_server(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}",
        redis_url="",
        data_dir=tmp_path,
    )
    try:
        for turns in range(20):
            watch = Restorer(guard_of(server), check_seconds=0)
            await watch.start()
            for _ in range(turns % 7):
                await asyncio.sleep(0)
            await asyncio.wait_for(watch.stop(), 5)
    finally:
        await server.stop()
