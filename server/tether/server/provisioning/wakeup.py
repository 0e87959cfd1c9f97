"""Waking waiters the moment something they wait for commits.

Topics name what changed: "i:<partner_id>" (instructions of a partner became
deliverable) and "e:<device digest hex>" (a device's entitlement feed grew).
Inside this process a commit wakes waiters directly; on PostgreSQL every
commit also sends NOTIFY, which each Tether process receives on a dedicated
asyncpg connection, so a dispatcher in another replica wakes too. Waiters
still poll slowly, as a safety net for a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tether.server import logs

log = logs.get(__name__)

CHANNEL = "tether_provisioning"
_PENDING_KEY = "tether_wakeup_topics"
MAX_PAYLOAD = 7900


def instructions_topic(partner_id: str) -> str:
    return f"i:{partner_id}"


def feed_topic(device_digest: bytes) -> str:
    return f"e:{device_digest.hex()}"


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    pending: dict[Wakeup, set[str]] = session.info.get(_PENDING_KEY, {})
    topics = sorted({t for w, ts in pending.items() if w.postgres for t in ts})
    # Runs inside the async session's greenlet: a plain execute is fine.
    for payload in _payloads(topics):
        session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": CHANNEL, "payload": payload},
        )


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

        On PostgreSQL the topics also go out as one NOTIFY just before the
        commit; NOTIFY is transactional, so other processes hear it only if
        the transaction commits.
        """
        pending: dict[Wakeup, set[str]] = session.sync_session.info.setdefault(_PENDING_KEY, {})
        pending.setdefault(self, set()).update(topics)

    # --- the PostgreSQL listener ---------------------------------------

    async def start(self) -> None:
        if not self.postgres:
            self.listening.set()
            return
        self._task = asyncio.create_task(self._listen_forever(), name="provisioning-listen")

    def close_waiters(self) -> None:
        self.closing = True
        self.wake(*list(self._waiters))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.wake(*payload.split())

    async def _listen_forever(self) -> None:
        dsn = make_url(self._url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("LISTEN connection failed; retrying", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                # Whatever was notified while we were away is found by the
                # waiters' own reads: wake everyone once.
                self.wake(*list(self._waiters))
                await lost.wait()
                log.warning("LISTEN connection lost; reconnecting")
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
