"""Restores the Redis counters from SQL after Redis lost its data, and
moves an identity's counts after an operator's correction.

Each still-valid entry goes back with its original expiry and network,
under the identity its fingerprint belongs to now (links, merges and
operators' corrections included), so a Redis restart neither resets
anyone's limits nor extends a session. Restoring only adds, so running it
twice, or while traffic flows, is safe.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from redis.crc import key_slot
from sqlalchemy import or_, select

from tether.server.guard import keys
from tether.server.guard.counters import FOREVER_MS, Entry
from tether.server.guard.service import Guard
from tether.server.guard.tables import GuardEntry, GuardFarmed

CHUNK = 5000


def _ms(value: datetime | None) -> int:
    return FOREVER_MS if value is None else int(value.timestamp() * 1000)


async def rebuild(
    guard: Guard,
    service_id: str = "",
    identities: set[str] | None = None,
    slots: set[int] | None = None,
) -> int:
    """Writes SQL's entries back to Redis; only those of `identities` (as
    they resolve now) when given, and only keys in `slots` (a Redis
    Cluster's master that lost them) when given. Returns the entries added."""
    await guard.recorder.flush()
    now = datetime.now(UTC)
    query = select(GuardEntry).where(
        or_(GuardEntry.expire_time.is_(None), GuardEntry.expire_time > now)
    )
    farmed_query = select(GuardFarmed)
    if service_id:
        query = query.where(GuardEntry.service_id == service_id)
        farmed_query = farmed_query.where(GuardFarmed.service_id == service_id)
    book = guard.book
    if identities is not None:
        fingerprints = {member for identity in identities for member in book.members(identity)}
        query = query.where(GuardEntry.identity.in_(fingerprints | identities))
    async with guard.db.sessions() as session:
        result = await session.stream_scalars(query.execution_options(yield_per=CHUNK))
        rows = [row async for row in result]
        farmed_rows = (await session.scalars(farmed_query)).all()
    groups: dict[tuple[str, str, str, str], list[Entry]] = defaultdict(list)
    for row in rows:
        identity = book.find(row.identity)
        if identities is not None and identity not in identities:
            continue
        groups[(row.service_id, row.action, row.room_id, identity)].append(
            Entry(
                row.member,
                int(row.create_time.timestamp() * 1000),
                _ms(row.expire_time),
                row.network or "0" * 16,
            )
        )
    farmed = {
        (row.service_id, row.action, row.room_id, book.find(row.identity)) for row in farmed_rows
    }
    restored = 0
    for (service, action, room, identity), entries in groups.items():
        key = guard.decider.key(service, action, room, identity)
        if slots is not None and key_slot(key.encode()) not in slots:
            continue
        restored += await guard.counters.restore(
            key,
            keys.field(identity, room),
            entries,
            farmed=(service, action, room, identity) in farmed,
        )
    return restored
