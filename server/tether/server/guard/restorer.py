"""Keeps the guard's Redis counters whole: when Redis comes back empty (a
restart without persistence, a flush, embedded mode's fresh fakeredis), the
guard restores every live entry from SQL before it counts again, so no
restart of Tether or Redis raises a limit.

How an empty Redis is noticed: a marker key, written after each restore.
- at start, before the server takes calls;
- on every new connection of the evaluate path (a restarted Redis closes
  them all): while the marker is missing, calls get the policy's fail mode
  and one restore runs;
- every CHECK_SECONDS, for a flush that closes no connection (and for the
  redis-py path used without the pipelined connection).

Every process on one Redis (workers, replicas) notices the loss; one of
them restores for all: it claims RESTORING (a key that lives CLAIM_MS and
is kept alive while the restore runs, so a restorer that dies frees it
soon), and the others wait for the marker, their calls meanwhile in the
fail mode. Restoring only adds, so a second restore after a lost claim is
harmless, just wasted work.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as redis_errors

from tether.server import logs
from tether.server.counters.connection import KEY_PREFIX
from tether.server.guard import rebuild
from tether.server.guard.counters import CountersDown
from tether.server.guard.service import Guard

log = logs.get(__name__)

MARKER = f"{KEY_PREFIX}:g:restored"
RESTORING = f"{KEY_PREFIX}:g:restoring"
CHECK_SECONDS = 1.0
CLAIM_MS = 30_000


class Restorer:
    def __init__(self, guard: Guard, check_seconds: float = CHECK_SECONDS) -> None:
        self._guard = guard
        self._check_seconds = check_seconds
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._restoring: asyncio.Task[bool] | None = None
        # Restores done since start (tests and operators read it).
        self.restores = 0
        if guard.counters.pipelined is not None:
            guard.counters.pipelined.on_open = self._check_connection

    async def ensure(self) -> bool:
        """Restores the counters when Redis lost them; True when it did."""
        async with self._lock:
            counters = self._guard.counters
            if await counters.exists(MARKER):
                return False
            if not await counters.claim(RESTORING, secrets.token_hex(8), CLAIM_MS):
                return False  # another process restores; the marker will say when
            keeping = asyncio.create_task(self._keep_claim(), name="guard-restore-claim")
            try:
                restored = await rebuild.rebuild(self._guard)
                await counters.mark(MARKER)
            finally:
                keeping.cancel()
                with contextlib.suppress(CountersDown, asyncio.CancelledError):
                    await counters.delete(RESTORING)
            self.restores += 1
            log.warning("guard counters restored from SQL (Redis had lost them)", entries=restored)
            return True

    async def _keep_claim(self) -> None:
        while True:
            await asyncio.sleep(CLAIM_MS / 3000)
            with contextlib.suppress(CountersDown):
                await self._guard.counters.extend(RESTORING, CLAIM_MS)

    async def start(self) -> None:
        try:
            await self.ensure()
        except CountersDown as exc:
            # The watcher restores them when Redis answers.
            log.warning("guard counters not checked at start: Redis is down", error=str(exc))
        self._watch = asyncio.create_task(self._watching(), name="guard-restorer")

    async def stop(self) -> None:
        for task in (self._watch, self._restoring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(self._check_seconds)
            with contextlib.suppress(CountersDown):
                await self.ensure()

    async def _check_connection(self, send: Callable[..., Awaitable[Any]]) -> None:
        if await send("EXISTS", MARKER) == 1:
            return
        if self._restoring is None or self._restoring.done():
            self._restoring = asyncio.create_task(self._restore_soon(), name="guard-restore")
        raise redis_errors.ConnectionError(
            "Redis lost the guard's counters; restoring them from SQL"
        )

    async def _restore_soon(self) -> bool:
        try:
            return await self.ensure()
        except CountersDown as exc:
            log.warning("guard counters not restored yet", error=str(exc))
            return False
