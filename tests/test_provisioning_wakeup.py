"""Wake-ups across processes: committed topics reach another process's
Wakeup through PostgreSQL NOTIFY, sent after the commit by the notifier."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from tether.server.provisioning.store_postgres import PostgresBroadcast
from tether.server.provisioning.wakeup import Wakeup, feed_topic
from tether.server.storage.database import Database


@pytest.fixture
async def pair(postgres_url: str) -> AsyncIterator[tuple[Database, Wakeup, Wakeup]]:
    """A database and two started Wakeups on it, as two processes would hold."""
    db = Database(postgres_url, 2)
    sender = Wakeup(PostgresBroadcast(postgres_url))
    receiver = Wakeup(PostgresBroadcast(postgres_url))
    await sender.start()
    await receiver.start()
    await asyncio.wait_for(receiver.listening.wait(), 10)
    yield db, sender, receiver
    await sender.stop()
    await receiver.stop()
    await db.close()


async def _commit_with(db: Database, wakeup: Wakeup, *topics: str) -> None:
    async with db.transaction() as session:
        await session.execute(text("SELECT 1"))
        await wakeup.publish(session, *topics)


async def test_topics_committed_in_many_transactions_all_wake_another_process(
    pair: tuple[Database, Wakeup, Wakeup],
) -> None:
    db, sender, receiver = pair
    # 2,000 device topics need far more than one 8000-byte NOTIFY payload.
    topics = [feed_topic(i.to_bytes(32, "big")) for i in range(2000)]
    with contextlib.ExitStack() as stack:
        flags = [stack.enter_context(receiver.subscribe(t)) for t in topics]
        await asyncio.gather(
            *(_commit_with(db, sender, *topics[i : i + 100]) for i in range(0, 2000, 100))
        )
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 10)


async def test_a_rolled_back_transaction_wakes_no_other_process(
    pair: tuple[Database, Wakeup, Wakeup],
) -> None:
    db, sender, receiver = pair
    with receiver.subscribe("i:rolled-back") as rolled_back, receiver.subscribe("i:kept") as kept:
        with contextlib.suppress(RuntimeError):
            async with db.transaction() as session:
                await session.execute(text("SELECT 1"))
                await sender.publish(session, "i:rolled-back")
                raise RuntimeError("roll back")
        await _commit_with(db, sender, "i:kept")
        # One notifier connection sends in commit order and the listener
        # hears in that order: had the first been sent, it would be here.
        await asyncio.wait_for(kept.wait(), 10)
        assert not rolled_back.is_set()
