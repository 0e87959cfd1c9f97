"""Leasing instructions to one deliverer (a partner stream or a fetch).

A deliverable instruction is pending and due, or leased with its lease run
out. Rows are claimed with SELECT ... FOR UPDATE SKIP LOCKED, so several
Tether processes on one PostgreSQL never hand one instruction to two
streams at once, and none waits for another's locks. (SQLite serializes
writers instead; its FOR UPDATE is a no-op.)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from tether.server.observability import metrics
from tether.server.provisioning.tables import DEAD, LEASED, PENDING, Instruction
from tether.server.settings import Settings
from tether.server.storage.base import utcnow


@dataclass(frozen=True)
class Timing:
    """The delivery knobs, taken from Settings once."""

    ack_deadline: float
    backoff_factor: float
    max_backoff: float
    retry_delay: float
    max_attempts: int

    @classmethod
    def of(cls, settings: Settings) -> Timing:
        return cls(
            ack_deadline=settings.provisioning_ack_deadline_seconds,
            backoff_factor=settings.provisioning_backoff_factor,
            max_backoff=settings.provisioning_max_backoff_seconds,
            retry_delay=settings.provisioning_retry_delay_seconds,
            max_attempts=settings.provisioning_max_attempts,
        )

    def _grown(self, base: float, attempt: int) -> timedelta:
        ceiling = max(self.max_backoff, base)
        return timedelta(seconds=min(base * self.backoff_factor ** max(attempt - 1, 0), ceiling))

    def lease_for(self, attempt: int) -> timedelta:
        """How long delivery number `attempt` waits for its confirmation."""
        return self._grown(self.ack_deadline, attempt)

    def retry_after(self, attempt: int) -> timedelta:
        """The wait after a retryable failure of delivery number `attempt`."""
        return self._grown(self.retry_delay, attempt)


@dataclass(frozen=True)
class Delivery:
    """What a lease hands to a deliverer: the instruction as it goes out."""

    seq: int
    instruction_id: uuid.UUID
    kind: str
    service_id: str
    binding_id: uuid.UUID
    partner_reference: str
    account_kind: str
    account_digest: bytes
    state: str
    attempts: int
    create_time: datetime
    # The end of the lease.
    due_time: datetime
    # Who holds it: a stream ("stream:<id>") or a fetch ("fetch:<credential>").
    lease_owner: str | None
    # The traceparent of the call that wrote it; "": none.
    trace_parent: str


async def lease(
    session: AsyncSession | AsyncConnection,
    partner_id: str,
    *,
    owner: str,
    limit: int,
    timing: Timing,
    now: datetime | None = None,
) -> list[Delivery]:
    """Claims up to `limit` deliverable instructions of the partner for `owner`.

    Instructions already delivered max_attempts times are parked as dead
    instead. Returns the leased rows, oldest first. One statement, atomic
    by itself: it may run on an autocommit connection.
    """
    if limit <= 0:
        return []
    now = now or utcnow()
    i = Instruction
    due = (
        select(i.seq)
        .where(i.partner_id == partner_id, i.state.in_((PENDING, LEASED)), i.due_time <= now)
        .order_by(i.seq)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    spent = i.attempts >= timing.max_attempts
    # The lease grows with each delivery; one CASE keeps it a single
    # UPDATE ... RETURNING round trip on both databases.
    lease_end = case(
        *((i.attempts == n, now + timing.lease_for(n + 1)) for n in range(timing.max_attempts)),
        else_=now + timing.lease_for(timing.max_attempts),
    )
    statement = (
        update(i)
        .where(i.seq.in_(due))
        .values(
            state=case((spent, DEAD), else_=LEASED),
            attempts=case((spent, i.attempts), else_=i.attempts + 1),
            lease_owner=case((spent, None), else_=owner),
            due_time=case((spent, i.due_time), else_=lease_end),
            update_time=now,
        )
        .returning(*(getattr(i, name) for name in Delivery.__dataclass_fields__))
        .execution_options(synchronize_session=False)
    )
    rows = [Delivery(*row) for row in await session.execute(statement)]
    count_leased(rows)
    return sorted((r for r in rows if r.state == LEASED), key=lambda r: r.seq)


def count_leased(rows: list[Delivery]) -> None:
    """Counts what a lease did: rows delivered again, and rows parked as
    dead (the lease answers only the leased)."""
    dead = again = 0
    for row in rows:
        if row.state == DEAD:
            dead += 1
        elif row.attempts > 1:
            again += 1
    if dead:
        metrics.DEAD_INSTRUCTIONS.inc(dead)
    if again:
        metrics.REDELIVERIES.inc(again)


async def release(session: AsyncSession, owner: str) -> list[str]:
    """Returns every lease of a dropped deliverer to the pool at once.

    Returns the partners concerned, so their other streams can be woken.
    """
    now = utcnow()
    released = await session.execute(
        update(Instruction)
        .where(Instruction.lease_owner == owner, Instruction.state == LEASED)
        .values(state=PENDING, lease_owner=None, due_time=now, update_time=now)
        .returning(Instruction.partner_id)
    )
    return sorted({partner for (partner,) in released})
