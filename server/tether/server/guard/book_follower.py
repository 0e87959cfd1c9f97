"""Keeps this process's identity book in step with the others.

Each Tether process (a worker, a replica) keeps its own identity book in
memory, and records what it learns in SQL. Every FOLLOW_SECONDS the
follower reads what the other processes recorded since (identity_record.
follow), so a browser that drifts while its calls land on different
processes is still linked to itself: a drift seen here is known everywhere
within about a second. Every SWEEP_SECONDS the read looks minutes back, for
what a stalled writer committed late (identity_record.follow).
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.exc import SQLAlchemyError

from tether.server import logs
from tether.server.guard.service import Guard
from tether.server.shared.tasks import raise_if_cancelled

log = logs.get(__name__)

FOLLOW_SECONDS = 0.5
SWEEP_SECONDS = 60.0


class BookFollower:
    def __init__(self, guard: Guard, every: float = FOLLOW_SECONDS) -> None:
        self._guard = guard
        self._every = every
        self._task: asyncio.Task[None] | None = None
        # Records taken from other processes since start (tests read it).
        self.applied = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._following(), name="guard-book-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _following(self) -> None:
        rounds = 0
        sweep_every = max(1, round(SWEEP_SECONDS / self._every))
        while True:
            await asyncio.sleep(self._every)
            rounds += 1
            try:
                self.applied += await self._guard.follow(sweep=rounds % sweep_every == 0)
            except (OSError, SQLAlchemyError) as exc:
                # The next round reads the same rows again.
                log.warning("guard identity book not followed", error=str(exc))
            raise_if_cancelled()
