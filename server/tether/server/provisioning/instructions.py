"""The instructions as internal services see them: counts per partner and
state (the pipeline), the listing, and the replay of dead ones."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import FailedPrecondition, NotFound
from tether.server.provisioning.tables import DEAD, INSTRUCTION_STATES, PENDING, Instruction
from tether.server.provisioning.wakeup import Wakeup, instructions_topic
from tether.server.storage.base import utcnow


@dataclass(frozen=True)
class Stage:
    partner_id: str
    state: str
    count: int
    oldest_age: timedelta


async def stages(session: AsyncSession, partner_id: str = "") -> list[Stage]:
    statement = select(
        Instruction.partner_id,
        Instruction.state,
        func.count(),
        func.min(Instruction.create_time),
    )
    if partner_id:
        statement = statement.where(Instruction.partner_id == partner_id)
    grouped = statement.group_by(Instruction.partner_id, Instruction.state)
    rows = (await session.execute(grouped)).all()
    now = utcnow()
    result = []
    for partner, state, count, oldest in rows:
        # SQLite aggregates come back naive.
        first = oldest if oldest.tzinfo else oldest.replace(tzinfo=now.tzinfo)
        result.append(Stage(partner, state, int(count), max(now - first, timedelta(0))))
    order = {state: n for n, state in enumerate(INSTRUCTION_STATES)}
    return sorted(result, key=lambda s: (s.partner_id, order.get(s.state, 99)))


async def listing(
    session: AsyncSession, partner_id: str, state: str, after_seq: int | None, limit: int
) -> list[Instruction]:
    statement = select(Instruction).where(Instruction.partner_id == partner_id)
    if state:
        statement = statement.where(Instruction.state == state)
    if after_seq is not None:
        statement = statement.where(Instruction.seq > after_seq)
    return list(await session.scalars(statement.order_by(Instruction.seq).limit(limit)))


async def replay(session: AsyncSession, notify: Wakeup, instruction_id: uuid.UUID) -> Instruction:
    row = await session.scalar(
        select(Instruction).where(Instruction.instruction_id == instruction_id).with_for_update()
    )
    if row is None:
        raise NotFound(
            ErrorReason.ERROR_REASON_INSTRUCTION_NOT_FOUND,
            f"instruction {instruction_id} not found",
        )
    if row.state != DEAD:
        raise FailedPrecondition(
            ErrorReason.ERROR_REASON_INSTRUCTION_NOT_DEAD,
            f"instruction {instruction_id} is {row.state}; only dead ones can be replayed",
            metadata={"state": row.state},
        )
    now: datetime = utcnow()
    row.state = PENDING
    row.attempts = 0
    row.lease_owner = None
    row.due_time = now
    row.update_time = now
    await notify.publish(session, instructions_topic(row.partner_id))
    return row
