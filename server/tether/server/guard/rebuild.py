"""Restores the Redis counters from SQL after Redis lost its data.

Each still-valid entry goes back with its original expiry, so a Redis
restart neither resets anyone's limits nor extends a session. Restoring
only adds (ZADD GT), so running it twice, or while traffic flows, is safe.
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import groupby

from sqlalchemy import or_, select

from tether.server.guard import keys
from tether.server.guard.counters import FOREVER_MS
from tether.server.guard.service import Action, Guard, counter_field, counter_key
from tether.server.guard.tables import GuardEntry

CHUNK = 5000


def _ms(value: datetime | None) -> int:
    return FOREVER_MS if value is None else int(value.timestamp() * 1000)


async def rebuild(guard: Guard, service_id: str = "") -> int:
    await guard.recorder.flush()
    now = datetime.now(UTC)
    query = select(GuardEntry).where(
        or_(GuardEntry.expire_time.is_(None), GuardEntry.expire_time > now)
    )
    if service_id:
        query = query.where(GuardEntry.service_id == service_id)
    query = query.order_by(
        GuardEntry.service_id, GuardEntry.action, GuardEntry.room_id, GuardEntry.identity
    )
    restored = 0
    async with guard.db.sessions() as session:
        result = await session.stream_scalars(query.execution_options(yield_per=CHUNK))
        rows = [row async for row in result]
    # Rows come ordered by identity, hence by bucket (its leading bits).
    for (service, action, room, bucket), group in groupby(
        rows,
        key=lambda r: (
            r.service_id,
            r.action,
            r.room_id,
            keys.bucket(r.identity, guard.bucket_bits),
        ),
    ):
        key = counter_key(service, Action(action), room, bucket)
        restored += await guard.counters.restore(
            key, [(counter_field(row.identity, row.member), _ms(row.expire_time)) for row in group]
        )
    return restored
