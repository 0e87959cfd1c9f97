"""Waking waiters the moment something they wait for commits.

Topics name what changed: "i:<partner_id>" (instructions of a partner became
deliverable) and "e:<device digest hex>" (a device's entitlement feed grew).
Inside this process a commit wakes waiters directly. On PostgreSQL the
committed topics are also handed to a notifier task, which sends them as
NOTIFY on a connection of its own, after the commit and outside any writing
transaction: PostgreSQL serializes the commits of all transactions that
issued NOTIFY (the notify queue lock is held through the commit's WAL flush),
which capped binding commits at ~450/s when each binding transaction sent
its own. Topics that pile up while a send is in flight go out together in
the next one. Each Tether process receives them on a dedicated LISTEN
connection, so a dispatcher in another replica wakes too.

A process that dies between a commit and its NOTIFY (or loses its
connection then) loses only the wake-up, never data: waiters still poll
slowly, and that poll is the safety net for any lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tether.server import logs
from tether.server.storage import listener

log = logs.get(__name__)

CHANNEL = "tether_provisioning"
_PENDING_KEY = "tether_wakeup_topics"
MAX_PAYLOAD = 7900
# Topics waiting for the notifier. One per partner or device changed since
# the last send, so this is reached only if PostgreSQL stops answering the
# notifier while commits still succeed; past it the topics are dropped and
# the waiters' slow poll finds the work.
MAX_UNSENT = 100_000
# One statement, one round trip and one (tiny) transaction per send.
_NOTIFY_SQL = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"


def instructions_topic(partner_id: str) -> str:
    return f"i:{partner_id}"


def feed_topic(device_digest: bytes) -> str:
    return f"e:{device_digest.hex()}"


def _payloads(topics: list[str]) -> list[str]:
    """Space-separated topics, cut below PostgreSQL's 8000-byte NOTIFY limit."""
    payloads: list[str] = []
    current = ""
    for topic in topics:
        if current and len(current) + 1 + len(topic) > MAX_PAYLOAD:
            payloads.append(current)
            current = ""
        current = f"{current} {topic}" if current else topic
    if current:
        payloads.append(current)
    return payloads


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending: dict[Wakeup, set[str]] = session.info.pop(_PENDING_KEY, {})
    for wakeup, topics in pending.items():
        wakeup.wake(*topics)
        wakeup.notify_later(topics)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)


class Wakeup:
    """Per-topic asyncio events, fed by local commits and PostgreSQL NOTIFY."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.postgres = not database_url.startswith("sqlite")
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        # Committed topics not yet sent as NOTIFY, and the notifier's state.
        self._unsent: set[str] = set()
        self._unsent_ready = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self._notify_conn: asyncpg.Connection | None = None
        # Set at shutdown: long waits (device watches) end, so that the
        # server's drain does not wait for them.
        self.closing = False

    # --- waiting -------------------------------------------------------

    @contextlib.contextmanager
    def subscribe(self, *topics: str) -> Iterator[asyncio.Event]:
        """An event set whenever one of the topics is woken; clear it before reading."""
        flag = asyncio.Event()
        for topic in topics:
            self._waiters[topic].add(flag)
        try:
            yield flag
        finally:
            for topic in topics:
                self._waiters[topic].discard(flag)
                if not self._waiters[topic]:
                    del self._waiters[topic]

    @property
    def subscribed_topics(self) -> int:
        """How many topics someone waits on (for health views and tests)."""
        return len(self._waiters)

    def wake(self, *topics: str) -> None:
        for topic in topics:
            for flag in self._waiters.get(topic, ()):
                flag.set()

    # --- publishing from inside a transaction --------------------------

    async def publish(self, session: AsyncSession, *topics: str) -> None:
        """Wakes the topics' waiters once the session's transaction commits.

        On PostgreSQL the topics then go to the other processes through
        the notifier (see notify_later); a rolled-back transaction sends
        nothing.
        """
        pending: dict[Wakeup, set[str]] = session.sync_session.info.setdefault(_PENDING_KEY, {})
        pending.setdefault(self, set()).update(topics)

    def committed(self, *topics: str) -> None:
        """Wakes topics whose change has just committed without a session
        (what the session's after-commit hook does for publish)."""
        self.wake(*topics)
        self.notify_later(set(topics))

    # --- telling the other processes ---------------------------------

    def notify_later(self, topics: set[str]) -> None:
        """Queues committed topics for the notifier; never waits."""
        if not self.postgres or not topics:
            return
        if len(self._unsent) + len(topics) > MAX_UNSENT:
            log.warning("NOTIFY backlog full; dropping it", topics=len(self._unsent))
            self._unsent.clear()
        self._unsent.update(topics)
        self._unsent_ready.set()

    async def _send(self, conn: asyncpg.Connection, topics: set[str]) -> None:
        await conn.execute(_NOTIFY_SQL, CHANNEL, _payloads(sorted(topics)))

    async def _notify_forever(self) -> None:
        while True:
            await self._unsent_ready.wait()
            conn = self._notify_conn
            if conn is None or conn.is_closed():
                try:
                    # Losing a NOTIFY costs only a wake-up, so its commit
                    # need not wait for the WAL flush; it is still delivered
                    # at once (visibility does not wait for the flush).
                    conn = await asyncpg.connect(
                        listener.asyncpg_dsn(self._url),
                        server_settings={"synchronous_commit": "off"},
                    )
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("NOTIFY connection failed; retrying", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                self._notify_conn = conn
            self._unsent_ready.clear()
            topics, self._unsent = self._unsent, set()
            try:
                await self._send(conn, topics)
            except asyncio.CancelledError:
                self._unsent |= topics
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("NOTIFY failed; reconnecting", error=str(exc))
                self.notify_later(topics)
                self._notify_conn = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
                await asyncio.sleep(1.0)

    async def _stop_notifier(self) -> None:
        """Stops the notifier after one last, bounded, send of what is left."""
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifier
            self._notifier = None
        conn, self._notify_conn = self._notify_conn, None
        if conn is None:
            return
        if self._unsent and not conn.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._send(conn, self._unsent)
            self._unsent.clear()
        with contextlib.suppress(Exception):
            await conn.close(timeout=1)

    # --- the PostgreSQL listener ---------------------------------------

    async def start(self) -> None:
        if not self.postgres:
            self.listening.set()
            return
        self._task = asyncio.create_task(self._listen_forever(), name="provisioning-listen")
        self._notifier = asyncio.create_task(self._notify_forever(), name="provisioning-notify")

    def close_waiters(self) -> None:
        self.closing = True
        self.wake(*list(self._waiters))

    async def stop(self) -> None:
        await self._stop_notifier()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.wake(*payload.split())

    async def _listen_forever(self) -> None:
        await listener.listen_forever(
            listener.asyncpg_dsn(self._url),
            CHANNEL,
            self._on_notify,
            connected=self._listening,
            disconnected=self.listening.clear,
            what="LISTEN",
        )

    async def _listening(self, _conn: Any, _lost: asyncio.Event) -> None:
        self.listening.set()
        # Whatever was notified while we were away is found by the waiters'
        # own reads: wake everyone once.
        self.wake(*list(self._waiters))
