"""The per-device feed of entitlement changes that devices watch.

Positions count 1, 2, 3 ... per device. The counter row is bumped with an
upsert whose row lock lasts until commit, so two transactions touching one
device commit in position order: a watcher reading "after N" never skips an
event that commits late.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.binding import dialects
from tether.server.provisioning import wakeup
from tether.server.provisioning.tables import DeviceFeed, Entitlement, EntitlementEvent
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database

READ_BATCH = 500


async def _next_position(session: AsyncSession, device_digest: bytes) -> int:
    statement = dialects.insert(session, DeviceFeed).values(
        device_digest=device_digest, last_position=1
    )
    statement = statement.on_conflict_do_update(
        index_elements=[DeviceFeed.device_digest],
        set_={"last_position": DeviceFeed.last_position + 1},
    ).returning(DeviceFeed.last_position)
    position: int = (await session.execute(statement)).scalar_one()
    return position


async def record(session: AsyncSession, notify: wakeup.Wakeup, ent: Entitlement) -> None:
    """Appends the entitlement's current state to its device's feed."""
    session.add(
        EntitlementEvent(
            device_digest=ent.device_digest,
            position=await _next_position(session, ent.device_digest),
            binding_id=ent.binding_id,
            partner_id=ent.partner_id,
            service_id=ent.service_id,
            account_kind=ent.account_kind,
            account_digest=ent.account_digest,
            state=ent.state,
            reason=ent.reason,
            event_time=utcnow(),
        )
    )
    await notify.publish(session, wakeup.feed_topic(ent.device_digest))


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
    notify: wakeup.Wakeup,
    device_digests: list[bytes],
    after: int,
    poll_seconds: float,
) -> AsyncIterator[EntitlementEvent]:
    """Every event after `after`, then each new one as it commits; never ends.

    device_digests: the device under each configured digest key (rows
    written before a key rotation carry the old one).
    """
    topics = [wakeup.feed_topic(d) for d in device_digests]
    with notify.subscribe(*topics) as woken:
        while True:
            woken.clear()
            rows = await read_after(db, device_digests, after)
            for row in rows:
                yield row
                after = row.position
            if len(rows) == READ_BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), poll_seconds)
