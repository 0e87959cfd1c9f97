"""Waking waiters the moment something they wait for commits.

Topics name what changed: "i:<partner_id>" (instructions of a partner became
deliverable) and "e:<device digest hex>" (a device's entitlement feed grew).
Inside this process a commit wakes waiters directly. The committed topics
also go to the store's Broadcast, which tells the other Tether processes on
the same database (on PostgreSQL: NOTIFY after the commit, heard on a
LISTEN connection; see store_postgres.py), so a dispatcher in another
replica wakes too.

A process that dies between a commit and its broadcast loses only the
wake-up, never data: waiters still poll slowly, and that poll is the
safety net for any lost wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tether.server.provisioning.store import Broadcast

_PENDING_KEY = "tether_wakeup_topics"


def instructions_topic(partner_id: str) -> str:
    return f"i:{partner_id}"


def feed_topic(device_digest: bytes) -> str:
    return f"e:{device_digest.hex()}"


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
    """Per-topic asyncio events, fed by local commits and the broadcast."""

    def __init__(self, broadcast: Broadcast) -> None:
        self._broadcast = broadcast
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        # Set at shutdown: long waits (device watches) end, so that the
        # server's drain does not wait for them.
        self.closing = False

    @property
    def listening(self) -> asyncio.Event:
        """Set while other processes' wake-ups reach this one."""
        return self._broadcast.listening

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

    def _heard(self, topics: Sequence[str]) -> None:
        self.wake(*topics)

    def _wake_all(self) -> None:
        # Whatever was broadcast while we were not listening is found by
        # the waiters' own reads: wake everyone once.
        self.wake(*list(self._waiters))

    # --- publishing from inside a transaction --------------------------

    async def publish(self, session: AsyncSession, *topics: str) -> None:
        """Wakes the topics' waiters once the session's transaction commits,
        and then tells the other processes; a rolled-back transaction wakes
        nothing."""
        pending: dict[Wakeup, set[str]] = session.sync_session.info.setdefault(_PENDING_KEY, {})
        pending.setdefault(self, set()).update(topics)

    def committed(self, *topics: str) -> None:
        """Wakes topics whose change has just committed without a session
        (what the session's after-commit hook does for publish)."""
        self.wake(*topics)
        self.notify_later(set(topics))

    def notify_later(self, topics: set[str]) -> None:
        """Hands committed topics to the broadcast; never waits."""
        if topics:
            self._broadcast.send(topics)

    # --- lifecycle -----------------------------------------------------

    async def start(self) -> None:
        await self._broadcast.start(self._heard, self._wake_all)

    def close_waiters(self) -> None:
        self.closing = True
        self.wake(*list(self._waiters))

    async def stop(self) -> None:
        await self._broadcast.stop()
