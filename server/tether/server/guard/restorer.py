"""Keeps the guard's Redis counters whole: when Redis comes back empty (a
restart without persistence, a flush, embedded mode's fresh fakeredis), or
a cluster's replica that took over lacks the last writes of its master, the
guard restores every live entry from SQL before it counts again, so no
restart or failover of Tether or Redis raises a limit.

How a loss is noticed: a marker key, written after each restore. It names
the key layout (keys.LAYOUT): a server of a new layout finds none at its
first start, deletes the keys of the layout before and writes its own
from SQL, as after a loss.
- at start, before the server takes calls;
- on every new connection of the evaluate path (a restarted Redis, or a
  cluster's new master, means a new connection): while the marker is not
  right, calls get the policy's fail mode and one restore runs;
- every CHECK_SECONDS, for a flush that closes no connection (and for the
  redis-py path used without the pipelined connection).

Every process on one Redis (workers, replicas) notices the loss; one of
them restores for all: it claims RESTORING (a key that lives CLAIM_MS and
is kept alive while the restore runs, so a restorer that dies frees it
soon), and the others wait for the marker, their calls meanwhile in the
fail mode. Restoring only adds, so a second restore after a lost claim is
harmless, just wasted work.

On a Redis Cluster each master has its own marker, in its own first slot,
holding the master's node id: a replica that took over has another id (its
copy of the marker came from the old master), and a master restarted empty
has none, so either one's slots, and only those, are restored from SQL.
Registrations are in SQL before they are answered, and a replica takes
over only after the cluster's node timeout (seconds), so what the old
master admitted before it died is in SQL by then: no registration is
admitted beyond the limit after a failover. (Log-ins and rooms are written
behind; one admitted in the last instant before a failover may be missing
from both until its SQL record lands.)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis import exceptions as redis_errors

from tether.server import logs
from tether.server.counters.cluster import ClusterConnection, Master, tag_for_slot
from tether.server.counters.connection import KEY_PREFIX
from tether.server.guard import keys, rebuild
from tether.server.guard.counters import DOWN, CountersDown
from tether.server.guard.service import Guard
from tether.server.shared.tasks import raise_if_cancelled

log = logs.get(__name__)

MARKER = f"{KEY_PREFIX}:g:restored:{keys.LAYOUT}"
RESTORING = f"{KEY_PREFIX}:g:restoring"
CHECK_SECONDS = 1.0
CLAIM_MS = 30_000


def master_marker(master: Master) -> str:
    """A cluster master's marker: in its first slot, so it lives and dies
    with that master's data."""
    return f"{MARKER}:{{{tag_for_slot(master.first_slot)}}}"


class Restorer:
    def __init__(self, guard: Guard, check_seconds: float = CHECK_SECONDS) -> None:
        self._guard = guard
        self._check_seconds = check_seconds
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._restoring: asyncio.Task[bool] | None = None
        # Restores done since start (tests and operators read it).
        self.restores = 0
        pipelined = guard.counters.pipelined
        self._cluster = pipelined if isinstance(pipelined, ClusterConnection) else None
        if self._cluster is not None:
            self._cluster.on_open = self._check_master
            self._cluster.on_change = self._topology_changed
        elif pipelined is not None:
            pipelined.on_open = self._check_connection

    async def ensure(self) -> bool:
        """Restores the counters when Redis lost them; True when it did."""
        async with self._lock:
            if self._cluster is not None:
                return await self._ensure_masters(self._cluster)
            counters = self._guard.counters
            if await counters.exists(MARKER):
                return False
            async with self._claimed() as holder:
                if not holder:
                    return False  # another process restores; the marker will say when
                if await counters.exists(MARKER):
                    # Another process restored and let go of its claim
                    # between the look at the marker and this claim.
                    return False
                await counters.delete_matching(keys.LAYOUT_1)
                restored = await rebuild.rebuild(self._guard)
                if not await self._still_held(holder):
                    return False  # Redis lost its data again meanwhile: restore anew
                await counters.mark(MARKER)
            self.restores += 1
            log.warning("guard counters restored from SQL (Redis had lost them)", entries=restored)
            return True

    @contextlib.asynccontextmanager
    async def _claimed(self) -> AsyncIterator[str]:
        """This process's claim to restore ("" when another holds it), kept
        alive while it does."""
        counters = self._guard.counters
        holder = secrets.token_hex(8)
        if not await counters.claim(RESTORING, holder, CLAIM_MS):
            yield ""
            return
        keeping = asyncio.create_task(self._keep_claim(), name="guard-restore-claim")
        try:
            yield holder
        finally:
            keeping.cancel()
            with contextlib.suppress(CountersDown, asyncio.CancelledError):
                await counters.delete(RESTORING)

    async def _still_held(self, holder: str) -> bool:
        """Whether the claim survived the restore: a Redis that lost its data
        while SQL was read (a flush, a restart) lost the claim with it, and
        marking it restored would leave what it lost uncounted."""
        return await self._guard.counters.get(RESTORING) == holder.encode()

    async def _keep_claim(self) -> None:
        while True:
            await asyncio.sleep(CLAIM_MS / 3000)
            with contextlib.suppress(CountersDown):
                await self._guard.counters.extend(RESTORING, CLAIM_MS)
            raise_if_cancelled()

    async def _ensure_masters(self, cluster: ClusterConnection) -> bool:
        counters = self._guard.counters
        try:
            masters = await cluster.masters()
        except DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc
        if not await self._stale(masters):
            return False
        async with self._claimed() as holder:
            if not holder:
                return False
            # Looked at again: another process may have restored them and
            # let go of its claim meanwhile.
            stale = await self._stale(masters)
            if not stale:
                return False
            slots = set().union(*(master.slots() for master in stale))
            await counters.delete_matching(keys.LAYOUT_1)
            restored = await rebuild.rebuild(self._guard, slots=slots)
            if not await self._still_held(holder):
                return False
            for master in stale:
                await counters.mark(master_marker(master), master.id.encode())
        self.restores += 1
        log.warning(
            "guard counters restored from SQL (a master was new or had lost them)",
            masters=[f"{m.address[0]}:{m.address[1]}" for m in stale],
            entries=restored,
        )
        return True

    async def _stale(self, masters: list[Master]) -> list[Master]:
        """The masters whose marker does not name them."""
        counters = self._guard.counters
        return [m for m in masters if await counters.get(master_marker(m)) != m.id.encode()]

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
            raise_if_cancelled()

    async def _check_connection(self, send: Callable[..., Awaitable[Any]]) -> None:
        if await send("EXISTS", MARKER) == 1:
            return
        self._topology_changed()
        raise redis_errors.ConnectionError(
            "Redis lost the guard's counters; restoring them from SQL"
        )

    async def _check_master(self, send: Callable[..., Awaitable[Any]], master: Master) -> None:
        if await send("GET", master_marker(master)) == master.id.encode():
            return
        self._topology_changed()
        raise redis_errors.ConnectionError(
            f"the Redis Cluster master {master.address[0]}:{master.address[1]} is new or lost"
            " the guard's counters; restoring them from SQL"
        )

    def _topology_changed(self) -> None:
        """Checks the markers (and restores) soon, once at a time."""
        if self._restoring is None or self._restoring.done():
            self._restoring = asyncio.create_task(self._restore_soon(), name="guard-restore")

    async def _restore_soon(self) -> bool:
        try:
            return await self.ensure()
        except CountersDown as exc:
            log.warning("guard counters not restored yet", error=str(exc))
            return False
