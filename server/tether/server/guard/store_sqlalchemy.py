"""The guard store on SQLAlchemy (SQLite, embedded mode): the record's
Core upserts, built once, in one transaction per batch."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import delete, tuple_
from sqlalchemy import insert as sa_insert
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.guard.recorder import ENTRY_COLUMNS, Batch
from tether.server.guard.tables import (
    GuardEntry,
    GuardFarmed,
    GuardFingerprint,
    GuardLink,
    GuardLinkRecord,
    GuardSighting,
)
from tether.server.storage import dialects
from tether.server.storage.database import Database


class SqlAlchemyGuardStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._core: _CoreStatements | None = None

    async def write(self, batch: Batch) -> None:
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
                        dict(zip((*ENTRY_COLUMNS, "expire_time", "network"), put, strict=True))
                        for put in batch.puts
                    ],
                )
            if batch.links:
                await session.execute(statements.links, batch.links)
            if batch.fingerprints:
                await session.execute(statements.fingerprints, batch.fingerprints)
            if batch.link_records:
                await session.execute(insert_plain(GuardLinkRecord), batch.link_records)
            if batch.sightings:
                await session.execute(
                    statements.sightings,
                    [
                        {"fingerprint": f, "network": n, "hour": h, "minute": m}
                        for f, n, h, m in batch.sightings
                    ],
                )
            if batch.farmed:
                await session.execute(
                    statements.farmed,
                    [
                        {"service_id": s, "action": a, "room_id": r, "identity": i}
                        for s, a, r, i in batch.farmed
                    ],
                )


def insert_plain(table: Any) -> Any:
    return sa_insert(table)


class _CoreStatements:
    """The Core statements of write, for the session's dialect."""

    def __init__(self, session: AsyncSession) -> None:
        insert = functools.partial(dialects.insert, session)
        self._key = tuple_(*(getattr(GuardEntry, name) for name in ENTRY_COLUMNS))
        stmt = insert(GuardEntry.__table__)
        self.put = stmt.on_conflict_do_update(
            index_elements=list(ENTRY_COLUMNS),
            set_={"expire_time": stmt.excluded.expire_time, "network": stmt.excluded.network},
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
        stmt = insert(GuardFingerprint.__table__)
        self.fingerprints = stmt.on_conflict_do_update(
            index_elements=["fingerprint"],
            set_={
                "last_seen_time": stmt.excluded.last_seen_time,
                "last_network": stmt.excluded.last_network,
            },
        )
        self.sightings = insert(GuardSighting.__table__).on_conflict_do_nothing()
        self.farmed = insert(GuardFarmed.__table__).on_conflict_do_nothing()

    def drop(self, keys: list[tuple[Any, ...]]) -> Any:
        return delete(GuardEntry).where(self._key.in_(keys))
