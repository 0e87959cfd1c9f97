"""Writes the guard's durable record to SQL in batches.

Evaluate must cost about one Redis round trip, so SQL writes leave the hot
path: each change is queued and a single writer commits whatever has piled up
in one transaction (group commit). Registrations wait for their commit (they
must survive Redis, and the caller is told only once they do); log-ins, room
joins and look-up links are written behind, a few milliseconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server import logs
from tether.server.guard.tables import GuardEntry, GuardIdentity, GuardLink
from tether.server.storage import dialects
from tether.server.storage.base import utcnow
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
    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._urgent = asyncio.Event()
        self._core: _CoreStatements | None = None

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
        batch = _Batch.of(changes)
        if batch.empty:
            return
        if self._db.is_sqlite:
            await self._write_core(batch)
        else:
            await self._write_driver(batch)

    async def _write_driver(self, batch: _Batch) -> None:
        """PostgreSQL: the whole batch in one statement (one round trip, its
        own transaction), each table's rows as arrays unnested in SQL, on a
        bare asyncpg connection. The Core upserts, built, compiled and bound
        row by row in a transaction of four statements, cost ~200 us of the
        event loop's CPU per written-behind call in batches of ~10, and
        PostgreSQL ran each row as a statement of its own."""
        identities = [
            (
                ident["identity"],
                # What SQLAlchemy's JSON type binds.
                json.dumps(ident["sketch"]),
                ident["first_seen_time"],
                ident["last_seen_time"],
            )
            for ident in batch.identities
        ]
        links = [
            (
                link["service_id"],
                link["identity"],
                link["account_digest"],
                link["key_id"],
                link["last_action"],
                link["first_seen_time"],
                link["last_seen_time"],
            )
            for link in batch.links
        ]
        async with self._db.driver_connection() as connection:
            await connection.execute(
                _PG_WRITE,
                *_columns(batch.drops, 5),
                *_columns(batch.puts, 6),
                utcnow(),
                *_columns(links, 7),
                *_columns(identities, 4),
            )

    async def _write_core(self, batch: _Batch) -> None:
        """SQLite (embedded mode): the Core upserts, built once."""
        statements = self._core
        async with self._db.transaction() as session:
            if statements is None:
                statements = self._core = _CoreStatements(session)
            if batch.drops:
                await session.execute(statements.drop(batch.drops))
            if batch.puts:
                await session.execute(
                    statements.put,
                    [
                        dict(zip((*_ENTRY_COLUMNS, "expire_time"), put, strict=True))
                        for put in batch.puts
                    ],
                )
            if batch.links:
                await session.execute(statements.links, batch.links)
            if batch.identities:
                await session.execute(statements.identities, batch.identities)


_ENTRY_COLUMNS = ("service_id", "action", "room_id", "identity", "member")


@dataclass
class _Batch:
    """The changes of one batch, merged: later changes win (an entry put
    then dropped in one batch is dropped), one row per key."""

    # Entry columns (_ENTRY_COLUMNS) plus the expiry, and entry columns.
    puts: list[tuple[Any, ...]]
    drops: list[tuple[Any, ...]]
    links: list[dict[str, Any]]
    identities: list[dict[str, Any]]

    @property
    def empty(self) -> bool:
        return not (self.puts or self.drops or self.links or self.identities)

    @classmethod
    def of(cls, changes: list[Change]) -> _Batch:
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


class _CoreStatements:
    """The Core statements of _write_core, for the session's dialect."""

    def __init__(self, session: AsyncSession) -> None:
        insert = functools.partial(dialects.insert, session)
        self._key = tuple_(*(getattr(GuardEntry, name) for name in _ENTRY_COLUMNS))
        stmt = insert(GuardEntry.__table__)
        self.put = stmt.on_conflict_do_update(
            index_elements=list(_ENTRY_COLUMNS),
            set_={"expire_time": stmt.excluded.expire_time},
        )
        stmt = insert(GuardLink.__table__)
        self.links = stmt.on_conflict_do_update(
            index_elements=["service_id", "identity", "account_digest"],
            set_={
                "key_id": stmt.excluded.key_id,
                "last_action": stmt.excluded.last_action,
                "last_seen_time": stmt.excluded.last_seen_time,
            },
        )
        stmt = insert(GuardIdentity.__table__)
        self.identities = stmt.on_conflict_do_update(
            index_elements=["identity"],
            set_={
                "sketch": stmt.excluded.sketch,
                "last_seen_time": stmt.excluded.last_seen_time,
            },
        )

    def drop(self, keys: list[tuple[Any, ...]]) -> Any:
        return delete(GuardEntry).where(self._key.in_(keys))


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column (width empty lists for no rows)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


# _write_driver's statement: one array per column. A batch holds one row per
# key (_Batch), as ON CONFLICT DO UPDATE needs, and never drops an entry it
# puts, so the parts touch different rows. Every part runs, also with no
# rows, and the statement commits as a whole or not at all.
_PG_WRITE = """
WITH dropped AS (
    DELETE FROM guard_entries AS e
    USING unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::bytea[])
        AS d(service_id, action, room_id, identity, member)
    WHERE e.service_id = d.service_id AND e.action = d.action AND e.room_id = d.room_id
        AND e.identity = d.identity AND e.member = d.member
), put AS (
    INSERT INTO guard_entries
        (service_id, action, room_id, identity, member, expire_time, create_time)
    SELECT service_id, action, room_id, identity, member, expire_time, $12
    FROM unnest($6::varchar[], $7::varchar[], $8::varchar[], $9::varchar[], $10::bytea[],
        $11::timestamptz[]) AS t(service_id, action, room_id, identity, member, expire_time)
    ON CONFLICT (service_id, action, room_id, identity, member)
    DO UPDATE SET expire_time = excluded.expire_time
), linked AS (
    INSERT INTO guard_links
        (service_id, identity, account_digest, key_id, last_action, first_seen_time,
        last_seen_time)
    SELECT * FROM unnest($13::varchar[], $14::varchar[], $15::bytea[], $16::varchar[],
        $17::varchar[], $18::timestamptz[], $19::timestamptz[])
    ON CONFLICT (service_id, identity, account_digest)
    DO UPDATE SET key_id = excluded.key_id, last_action = excluded.last_action,
        last_seen_time = excluded.last_seen_time
)
INSERT INTO guard_identities (identity, sketch, first_seen_time, last_seen_time)
SELECT identity, sketch::json, first_seen_time, last_seen_time
FROM unnest($20::varchar[], $21::text[], $22::timestamptz[], $23::timestamptz[])
    AS t(identity, sketch, first_seen_time, last_seen_time)
ON CONFLICT (identity)
DO UPDATE SET sketch = excluded.sketch, last_seen_time = excluded.last_seen_time
"""
