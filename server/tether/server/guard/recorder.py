"""Writes the guard's durable record to SQL in batches.

Evaluate must cost about one Redis round trip, so SQL writes leave the hot
path: each change is queued and a single writer commits whatever has piled up
in one transaction (group commit). Registrations wait for their commit (they
must survive Redis, and the caller is told only once they do); log-ins, room
joins and look-up links are written behind, a few milliseconds later. How a
batch is written is the store's (guard/store_postgres.py,
guard/store_sqlalchemy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tether.server import logs
from tether.server.guard.store import GuardStore

log = logs.get(__name__)

MAX_BATCH = 1000
# How long written-behind changes wait for company: one transaction per
# LINGER instead of one per call. A change someone awaits cuts it short.
LINGER_SECONDS = 0.02


@dataclass(frozen=True)
class EntryKey:
    service_id: str
    action: str
    room_id: str
    identity: str
    member: bytes


@dataclass
class Change:
    """What one guard call changes in SQL."""

    # Entries to (re)write with their expiry (None: never), or to delete.
    put: dict[EntryKey, datetime | None] = field(default_factory=dict)
    drop: set[EntryKey] = field(default_factory=set)
    links: list[dict[str, Any]] = field(default_factory=list)
    identities: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Item:
    change: Change
    done: asyncio.Future[None] | None


class Recorder:
    def __init__(self, store: GuardStore) -> None:
        self._store = store
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._urgent = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="guard-recorder")

    async def stop(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def later(self, change: Change) -> None:
        """Queues a change; it is committed shortly."""
        self._queue.put_nowait(_Item(change, None))

    async def commit(self, change: Change) -> None:
        """Queues a change and returns once it is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(change, done))
        self._urgent.set()
        await done

    async def flush(self) -> None:
        """Returns once everything queued so far is committed."""
        await self.commit(Change())

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if batch[0].done is None and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LINGER_SECONDS):
                        await self._urgent.wait()
            self._urgent.clear()
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write([item.change for item in batch])
            except Exception as exc:
                log.exception("guard record not written", changes=len(batch))
                for item in batch:
                    if item.done is not None and not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item in batch:
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)

    async def _write(self, changes: list[Change]) -> None:
        batch = Batch.of(changes)
        if batch.empty:
            return
        await self._store.write(batch)


ENTRY_COLUMNS = ("service_id", "action", "room_id", "identity", "member")


@dataclass
class Batch:
    """The changes of one batch, merged: later changes win (an entry put
    then dropped in one batch is dropped), one row per key."""

    # Entry columns (ENTRY_COLUMNS) plus the expiry, and entry columns.
    puts: list[tuple[Any, ...]]
    drops: list[tuple[Any, ...]]
    links: list[dict[str, Any]]
    identities: list[dict[str, Any]]

    @property
    def empty(self) -> bool:
        return not (self.puts or self.drops or self.links or self.identities)

    @classmethod
    def of(cls, changes: list[Change]) -> Batch:
        final: dict[EntryKey, tuple[bool, datetime | None]] = {}
        links: dict[tuple[str, str, bytes], dict[str, Any]] = {}
        identities: dict[str, dict[str, Any]] = {}
        for change in changes:
            for key, expire in change.put.items():
                final[key] = (True, expire)
            for key in change.drop:
                final[key] = (False, None)
            for link in change.links:
                links[(link["service_id"], link["identity"], link["account_digest"])] = link
            for ident in change.identities:
                identities[ident["identity"]] = ident
        return cls(
            puts=[(*_entry_values(key), expire) for key, (keep, expire) in final.items() if keep],
            drops=[_entry_values(key) for key, (keep, _) in final.items() if not keep],
            links=list(links.values()),
            identities=list(identities.values()),
        )


def _entry_values(key: EntryKey) -> tuple[Any, ...]:
    return (key.service_id, key.action, key.room_id, key.identity, key.member)
