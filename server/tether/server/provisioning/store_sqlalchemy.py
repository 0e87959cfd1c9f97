"""The provisioning store on SQLAlchemy: SQLite (embedded mode, one process).

Leases and confirmations take the general path, each in a transaction of
its own; there is no other process to wake or to relay usage queries to.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.provisioning import confirmations, entitlement_feed, leasing
from tether.server.provisioning.outbox import BindingOutbox
from tether.server.provisioning.store import AskHere, Broadcast, DeliveryStore, UsageRelay
from tether.server.provisioning.tables import ACTIVATING, LEASED, PENDING, Entitlement, Instruction
from tether.server.provisioning.usage_queries import UsageQueryOut, UsageReply
from tether.server.provisioning.wakeup import Wakeup, instructions_topic
from tether.server.shared.bindings import BindingListener
from tether.server.storage.base import Base, utcnow
from tether.server.storage.database import Database

_I = Base.metadata.tables[Instruction.__tablename__]
_E = Base.metadata.tables[Entitlement.__tablename__]
_ROW_COLUMNS = [_I.c[name] for name in confirmations.ROW_COLUMNS]


class SqlAlchemyProvisioningStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def broadcast(self) -> Broadcast:
        return LocalBroadcast()

    def delivery(self, wakeup: Wakeup, timing: leasing.Timing) -> DeliveryStore:
        return SqlAlchemyDelivery(self._db, wakeup, timing)

    def usage_relay(self, ask_here: AskHere) -> UsageRelay:
        return LocalUsageRelay(ask_here)

    def outbox(self, wakeup: Wakeup) -> BindingListener:
        return BindingOutbox(wakeup)


class SqlAlchemyDelivery:
    def __init__(self, db: Database, wakeup: Wakeup, timing: leasing.Timing) -> None:
        self._db = db
        self._wakeup = wakeup
        self._timing = timing

    async def lease(
        self, partner_id: str, *, owners: Sequence[str], now: datetime
    ) -> list[leasing.Delivery]:
        # SQLite serializes writers anyway: one lease per owner.
        rows: list[leasing.Delivery] = []
        for owner in dict.fromkeys(owners):
            async with self._db.transaction() as session:
                rows += await leasing.lease(
                    session,
                    partner_id,
                    owner=owner,
                    limit=owners.count(owner),
                    timing=self._timing,
                    now=now,
                )
        return rows

    async def next_due(self, partner_id: str) -> datetime | None:
        async with self._db.sessions() as session:
            due: datetime | None = await session.scalar(
                select(func.min(Instruction.due_time)).where(
                    Instruction.partner_id == partner_id,
                    Instruction.state.in_((PENDING, LEASED)),
                )
            )
        if due is not None and due.tzinfo is None:  # SQLite aggregates come back naive
            due = due.replace(tzinfo=utcnow().tzinfo)
        return due

    async def confirm(
        self, partner_id: str, items: Sequence[tuple[uuid.UUID, confirmations.Result]]
    ) -> list[confirmations.Applied]:
        async with self._db.transaction() as session:
            applied = await _confirm(
                session, self._wakeup, partner_id=partner_id, items=items, timing=self._timing
            )
            if any(a.outcome is confirmations.Outcome.RETRY_SCHEDULED for a in applied):
                await self._wakeup.publish(session, instructions_topic(partner_id))
        return applied

    async def close(self) -> None:
        return


class LocalBroadcast:
    """One process: no other process to tell or to hear."""

    def __init__(self) -> None:
        self._listening = asyncio.Event()

    @property
    def listening(self) -> asyncio.Event:
        return self._listening

    def send(self, topics: set[str]) -> None:
        return

    async def start(
        self, heard: Callable[[Sequence[str]], None], reconnected: Callable[[], None]
    ) -> None:
        self._listening.set()

    async def stop(self) -> None:
        return


class LocalUsageRelay:
    """One process: a usage question reaches only this process's streams."""

    def __init__(self, ask_here: AskHere) -> None:
        self._ask_here = ask_here

    async def start(self) -> None:
        return

    async def stop(self) -> None:
        return

    async def stream_opened(self, partner_id: str) -> None:
        return

    def stream_closed(self, partner_id: str) -> None:
        return

    async def ask_usage(
        self, partner_id: str, query: UsageQueryOut, wait_seconds: float
    ) -> UsageReply:
        return await self._ask_here(partner_id, query, wait_seconds)


async def _confirm(
    session: AsyncSession,
    notify: Wakeup,
    *,
    partner_id: str,
    items: Sequence[tuple[uuid.UUID, confirmations.Result]],
    timing: leasing.Timing,
) -> list[confirmations.Applied]:
    """Applies confirmations in the session's transaction; one Applied per
    item, in order.

    Rows are locked in delivery order (seq), so concurrent batches of one
    partner cannot deadlock. Core statements, not ORM objects.
    """
    ids = sorted({instruction_id for instruction_id, _ in items})
    locked = await session.execute(
        select(*_ROW_COLUMNS)
        .where(_I.c.instruction_id.in_(ids))
        .order_by(_I.c.seq)
        .with_for_update()
    )
    rows = {r.instruction_id: confirmations.Row(*r) for r in locked}
    now = utcnow()
    applied, effects = confirmations.decide(
        rows, [(partner_id, i, result) for i, result in items], timing, now
    )
    changed = [r for r in rows.values() if r.changed]
    if changed:
        await session.execute(
            update(_I)
            .where(_I.c.seq == bindparam("b_seq"))
            .values(
                state=bindparam("b_state"),
                due_time=bindparam("b_due"),
                lease_owner=bindparam("b_owner"),
                last_error=bindparam("b_error"),
                partner_service_reference=bindparam("b_ref"),
                update_time=now,
            ),
            [
                {
                    "b_seq": r.seq,
                    "b_state": r.state,
                    "b_due": r.due_time,
                    "b_owner": r.lease_owner,
                    "b_error": r.last_error,
                    "b_ref": r.partner_service_reference,
                }
                for r in changed
            ],
        )
    await _set_entitlements(session, notify, effects, now)
    return applied


async def _set_entitlements(
    session: AsyncSession,
    notify: Wakeup,
    effects: list[confirmations.Effect],
    now: datetime,
) -> None:
    if not effects:
        return
    binding_ids = sorted({row.binding_id for row, _, _ in effects})
    locked = await session.execute(
        select(*entitlement_feed.ENTRY_COLUMNS)
        .where(_E.c.binding_id.in_(binding_ids))
        .order_by(_E.c.binding_id, _E.c.service_id)
        .with_for_update()
    )
    entitlements = {(e.binding_id, e.service_id): entitlement_feed.Entry(*e) for e in locked}
    changed = []
    for row, state, reason in effects:
        entry = entitlements.get((row.binding_id, row.service_id))
        # Only an entitlement still being opened moves: a binding revoked in
        # the meantime stays revoked, whatever the partner says of the open.
        if entry is None or entry.state != ACTIVATING:
            continue
        entry.state = state
        entry.reason = reason
        changed.append(entry)
    if not changed:
        return
    await session.execute(
        update(_E)
        .where(_E.c.binding_id == bindparam("b_binding"), _E.c.service_id == bindparam("b_service"))
        .values(state=bindparam("b_state"), reason=bindparam("b_reason"), update_time=now),
        [
            {
                "b_binding": e.binding_id,
                "b_service": e.service_id,
                "b_state": e.state,
                "b_reason": e.reason,
            }
            for e in changed
        ],
    )
    await entitlement_feed.record(session, notify, changed)
