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
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import update

from tether.server import logs
from tether.server.guard.store import GuardStore
from tether.server.guard.tables import GuardEntry
from tether.server.observability import metrics
from tether.server.shared.tasks import raise_if_cancelled
from tether.server.storage.database import Database

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
    # The fingerprint the account was counted through.
    identity: str
    member: bytes


# A fingerprint seen from a network: (fingerprint, network, hour, minute of
# the hour's first sighting), one guard_sightings row.
Sighting = tuple[str, str, int, int]


@dataclass
class Change:
    """What one guard call changes in SQL."""

    # Entries to (re)write with their expiry (None: never) and network, or
    # to delete.
    put: dict[EntryKey, tuple[datetime | None, str]] = field(default_factory=dict)
    drop: set[EntryKey] = field(default_factory=set)
    # Identity-account links (guard_links rows).
    links: list[dict[str, Any]] = field(default_factory=list)
    # New fingerprints (guard_fingerprints rows) and the book's links,
    # merges and operators' corrections (guard_fingerprint_links rows).
    fingerprints: list[dict[str, Any]] = field(default_factory=list)
    link_records: list[dict[str, Any]] = field(default_factory=list)
    sightings: set[Sighting] = field(default_factory=set)
    # (service, action, room, identity) refused as one browser.
    farmed: set[tuple[str, str, str, str]] = field(default_factory=set)

    def empty(self) -> bool:
        return not (
            self.put
            or self.drop
            or self.links
            or self.fingerprints
            or self.link_records
            or self.sightings
            or self.farmed
        )


@dataclass
class _Item:
    change: Change
    done: asyncio.Future[None] | None
    # When it was queued (time.monotonic): the record's lag.
    queued: float = field(default_factory=time.monotonic)


class Recorder:
    def __init__(self, store: GuardStore) -> None:
        self._store = store
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._urgent = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="guard-recorder")

    async def stop(self) -> None:
        if self._task is None:
            return  # never started (a start that failed before it): nothing queued is written
        await self.flush()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def later(self, change: Change) -> None:
        """Queues a change; it is committed shortly."""
        if not change.empty():
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
            raise_if_cancelled()
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
            metrics.GUARD_RECORD_BATCH.observe(len(batch))
            metrics.GUARD_RECORD_LAG.observe(time.monotonic() - batch[0].queued)
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

    # Entry columns (ENTRY_COLUMNS) plus the expiry and network, and entry columns.
    puts: list[tuple[Any, ...]]
    drops: list[tuple[Any, ...]]
    links: list[dict[str, Any]]
    fingerprints: list[dict[str, Any]]
    link_records: list[dict[str, Any]]
    sightings: list[Sighting]
    farmed: list[tuple[str, str, str, str]]

    @property
    def empty(self) -> bool:
        return not (
            self.puts
            or self.drops
            or self.links
            or self.fingerprints
            or self.link_records
            or self.sightings
            or self.farmed
        )

    @classmethod
    def of(cls, changes: list[Change]) -> Batch:
        final: dict[EntryKey, tuple[bool, datetime | None, str]] = {}
        links: dict[tuple[str, str, bytes], dict[str, Any]] = {}
        fingerprints: dict[str, dict[str, Any]] = {}
        link_records: list[dict[str, Any]] = []
        sightings: set[Sighting] = set()
        farmed: set[tuple[str, str, str, str]] = set()
        for change in changes:
            for key, (expire, network) in change.put.items():
                final[key] = (True, expire, network)
            for key in change.drop:
                final[key] = (False, None, "")
            for link in change.links:
                links[(link["service_id"], link["identity"], link["account_digest"])] = link
            for row in change.fingerprints:
                known = fingerprints.get(row["fingerprint"])
                first = row["first_seen_time"] if known is None else known["first_seen_time"]
                fingerprints[row["fingerprint"]] = {**row, "first_seen_time": first}
            link_records += change.link_records
            sightings |= change.sightings
            farmed |= change.farmed
        return cls(
            puts=[
                (*_entry_values(key), expire, network)
                for key, (keep, expire, network) in final.items()
                if keep
            ],
            drops=[_entry_values(key) for key, (keep, _, _) in final.items() if not keep],
            links=list(links.values()),
            fingerprints=list(fingerprints.values()),
            link_records=link_records,
            sightings=sorted(sightings),
            farmed=sorted(farmed),
        )


def _entry_values(key: EntryKey) -> tuple[Any, ...]:
    return (key.service_id, key.action, key.room_id, key.identity, key.member)


async def renew_rows(db: Database, entries: set[EntryKey], expire_time: datetime) -> None:
    """A renewed login's new expiry, on whichever of the candidate rows
    exists (the account was counted through one of its identity's
    fingerprints)."""
    if not entries:
        return
    # The candidates differ only in the fingerprint: one statement.
    first = next(iter(entries))
    async with db.transaction() as session:
        await session.execute(
            update(GuardEntry)
            .where(
                GuardEntry.service_id == first.service_id,
                GuardEntry.action == first.action,
                GuardEntry.room_id == first.room_id,
                GuardEntry.member == first.member,
                GuardEntry.identity.in_([entry.identity for entry in entries]),
            )
            .values(expire_time=expire_time)
        )
