"""The per-device feed of entitlement changes that devices watch.

Positions count 1, 2, 3 ... per device. The counter row is bumped with an
upsert whose row lock lasts until commit, so two transactions touching one
device commit in position order: a watcher reading "after N" never skips an
event that commits late.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.provisioning.tables import DeviceFeed, Entitlement, EntitlementEvent
from tether.server.provisioning.wakeup import Wakeup, feed_topic
from tether.server.storage import dialects
from tether.server.storage.base import Base, utcnow
from tether.server.storage.database import Database

READ_BATCH = 500


@dataclass
class Entry:
    """What a feed event records of an entitlement (its columns, as read)."""

    binding_id: uuid.UUID
    service_id: str
    partner_id: str
    account_kind: str
    account_digest: bytes
    device_digest: bytes
    state: str
    reason: str


ENTRY_COLUMNS = [
    Base.metadata.tables[Entitlement.__tablename__].c[name] for name in Entry.__dataclass_fields__
]


async def _reserve(session: AsyncSession, counts: dict[bytes, int]) -> dict[bytes, int]:
    """Reserves counts[d] positions in each device's feed; returns each device's last.

    One upsert for all devices, in digest order so concurrent writers lock
    the counter rows in the same order and cannot deadlock.
    """
    table = DeviceFeed.__table__
    statement = dialects.insert(session, table).values(
        [{"device_digest": d, "last_position": counts[d]} for d in sorted(counts)]
    )
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.device_digest],
        set_={"last_position": table.c.last_position + statement.excluded.last_position},
    ).returning(table.c.device_digest, table.c.last_position)
    rows = (await session.execute(statement)).all()
    return {bytes(device): int(last) for device, last in rows}


async def record(
    session: AsyncSession, notify: Wakeup, entitlements: Sequence[Entry | Entitlement]
) -> None:
    """Appends the entitlements' current states to their devices' feeds, in order."""
    if not entitlements:
        return
    counts = Counter(ent.device_digest for ent in entitlements)
    last = await _reserve(session, counts)
    # Positions of one device count up to its reserved last, in list order.
    next_position = {d: last[d] - counts[d] + 1 for d in counts}
    now = utcnow()
    events = []
    for ent in entitlements:
        position = next_position[ent.device_digest]
        next_position[ent.device_digest] += 1
        events.append(
            {
                "device_digest": ent.device_digest,
                "position": position,
                "binding_id": ent.binding_id,
                "partner_id": ent.partner_id,
                "service_id": ent.service_id,
                "account_kind": ent.account_kind,
                "account_digest": ent.account_digest,
                "state": ent.state,
                "reason": ent.reason,
                "event_time": now,
            }
        )
    await session.execute(insert(Base.metadata.tables[EntitlementEvent.__tablename__]), events)
    await notify.publish(session, *(feed_topic(d) for d in sorted(counts)))


async def read_after(
    db: Database, device_digests: list[bytes], after: int, limit: int = READ_BATCH
) -> list[EntitlementEvent]:
    async with db.sessions() as session:
        rows = await session.scalars(
            select(EntitlementEvent)
            .where(
                EntitlementEvent.device_digest.in_(device_digests),
                EntitlementEvent.position > after,
            )
            .order_by(EntitlementEvent.position)
            .limit(limit)
        )
        return list(rows)


async def follow(
    db: Database,
    notify: Wakeup,
    device_digests: list[bytes],
    after: int,
    poll_seconds: float,
) -> AsyncIterator[EntitlementEvent]:
    """Every event after `after`, then each new one as it commits; never ends.

    device_digests: the device under each configured digest key (rows
    written before a key rotation carry the old one).
    """
    topics = [feed_topic(d) for d in device_digests]
    with notify.subscribe(*topics) as woken:
        while True:
            woken.clear()
            rows = await read_after(db, device_digests, after)
            for row in rows:
                yield row
                after = row.position
            if notify.closing:
                return  # the server stops: the device resumes elsewhere
            if len(rows) == READ_BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_seconds):
                    await woken.wait()
