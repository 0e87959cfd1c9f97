"""The transactional outbox: instructions written with the binding change.

The binding area calls `BindingOutbox.on_change` (its change hook, which
app.py hands the outbox to) inside the transaction of every created and
revoked binding. Everything written here commits or rolls
back with the binding itself: a binding never exists without its "open"
instructions, nor a revocation without its "close" ones.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import CTE, Integer, bindparam, cast, func, literal, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.provisioning import entitlement_feed
from tether.server.provisioning.tables import (
    ACTIVATING,
    CLOSE,
    FAILED,
    OPEN,
    PENDING,
    REVOKED,
    DeviceFeed,
    Entitlement,
    EntitlementEvent,
    Instruction,
)
from tether.server.provisioning.wakeup import Wakeup, feed_topic, instructions_topic
from tether.server.shared.bindings import BindingChange, BindingFacts, CreatedWrites
from tether.server.shared.partners import PresetService
from tether.server.storage.base import UtcDateTime, utcnow


def new_instruction(binding: BindingFacts, service_id: str, kind: str) -> Instruction:
    now = utcnow()
    return Instruction(
        partner_id=binding.partner_id,
        service_id=service_id,
        binding_id=binding.binding_id,
        kind=kind,
        partner_reference=binding.partner_reference,
        account_kind=binding.account_kind,
        account_digest=binding.account_digest,
        state=PENDING,
        attempts=0,
        due_time=now,
        create_time=now,
        update_time=now,
    )


class BindingOutbox:
    """The binding listener of the provisioning area (a SqlBindingListener)."""

    def __init__(self, notify: Wakeup) -> None:
        self._notify = notify

    async def __call__(self, session: AsyncSession, change: BindingChange) -> None:
        await self.on_change(session, change)

    async def on_change(self, session: AsyncSession, change: BindingChange) -> None:
        if change.change == "created":
            await self._opened(session, change.binding)
        else:
            await self._revoked(session, change.binding, change.reason or "unbound")

    async def _opened(self, session: AsyncSession, binding: BindingFacts) -> None:
        service_ids = list(
            await session.scalars(
                select(PresetService.service_id)
                .where(PresetService.partner_id == binding.partner_id)
                .order_by(PresetService.service_id)
            )
        )
        if not service_ids:
            return
        entitlements = []
        for service_id in service_ids:
            session.add(new_instruction(binding, service_id, OPEN))
            ent = Entitlement(
                binding_id=binding.binding_id,
                service_id=service_id,
                partner_id=binding.partner_id,
                account_kind=binding.account_kind,
                account_digest=binding.account_digest,
                device_digest=binding.device_digest,
                state=ACTIVATING,
                reason="",
                update_time=utcnow(),
            )
            session.add(ent)
            entitlements.append(ent)
        await entitlement_feed.record(session, self._notify, entitlements)
        await self._notify.publish(session, instructions_topic(binding.partner_id))

    def created_writes(self, created: CTE) -> CreatedWrites:
        """What _opened writes, as CTEs of the binding's INSERT (PostgreSQL).

        The same rows in the same order: per binding, one open instruction
        and one activating entitlement per preset service (by service id),
        and their events at the next positions of the device's feed, whose
        counter row stays locked until commit as in entitlement_feed.record.
        """
        now = bindparam("now", type_=UtcDateTime)
        services = (
            select(
                created.c.binding_id,
                created.c.partner_id,
                created.c.partner_reference,
                created.c.account_kind,
                created.c.account_digest,
                created.c.device_digest,
                PresetService.service_id,
            )
            .join(PresetService, PresetService.partner_id == created.c.partner_id)
            .cte("opened_services")
        )
        order = (services.c.partner_id, services.c.service_id)
        instructions = Instruction.__table__
        opened = (
            postgresql.insert(Instruction)
            .from_select(
                [
                    "instruction_id",
                    "partner_id",
                    "service_id",
                    "binding_id",
                    "kind",
                    "partner_reference",
                    "account_kind",
                    "account_digest",
                    "state",
                    "attempts",
                    "due_time",
                    "last_error",
                    "partner_service_reference",
                    "create_time",
                    "update_time",
                ],
                select(
                    func.gen_random_uuid(),
                    services.c.partner_id,
                    services.c.service_id,
                    services.c.binding_id,
                    literal(OPEN),
                    services.c.partner_reference,
                    services.c.account_kind,
                    services.c.account_digest,
                    literal(PENDING),
                    literal(0),
                    now,
                    literal(""),
                    literal(""),
                    now,
                    now,
                ).order_by(*order),
            )
            .returning(instructions.c.seq)
            .cte("opened_instructions")
        )
        entitled = (
            postgresql.insert(Entitlement)
            .from_select(
                [
                    "binding_id",
                    "service_id",
                    "partner_id",
                    "account_kind",
                    "account_digest",
                    "device_digest",
                    "state",
                    "reason",
                    "update_time",
                ],
                select(
                    services.c.binding_id,
                    services.c.service_id,
                    services.c.partner_id,
                    services.c.account_kind,
                    services.c.account_digest,
                    services.c.device_digest,
                    literal(ACTIVATING),
                    literal(""),
                    now,
                ),
            )
            .returning(Entitlement.__table__.c.binding_id)
            .cte("opened_entitlements")
        )
        feeds = DeviceFeed.__table__
        reserve = postgresql.insert(DeviceFeed).from_select(
            ["device_digest", "last_position"],
            select(services.c.device_digest, func.count())
            .group_by(services.c.device_digest)
            .order_by(services.c.device_digest),
        )
        reserved = reserve.on_conflict_do_update(
            index_elements=[feeds.c.device_digest],
            set_={"last_position": feeds.c.last_position + reserve.excluded.last_position},
        ).returning(feeds.c.device_digest, feeds.c.last_position)
        reserved_cte = reserved.cte("opened_feeds")
        # Positions of one device count up to its reserved last, in service order.
        position = (
            reserved_cte.c.last_position
            - func.count().over(partition_by=services.c.device_digest)
            + func.row_number().over(partition_by=services.c.device_digest, order_by=order)
        )
        events = (
            postgresql.insert(EntitlementEvent)
            .from_select(
                [
                    "device_digest",
                    "position",
                    "binding_id",
                    "partner_id",
                    "service_id",
                    "account_kind",
                    "account_digest",
                    "state",
                    "reason",
                    "event_time",
                ],
                select(
                    services.c.device_digest,
                    cast(position, postgresql.BIGINT),
                    services.c.binding_id,
                    services.c.partner_id,
                    services.c.service_id,
                    services.c.account_kind,
                    services.c.account_digest,
                    literal(ACTIVATING),
                    literal(""),
                    now,
                ).join(reserved_cte, reserved_cte.c.device_digest == services.c.device_digest),
            )
            .returning(EntitlementEvent.__table__.c.position)
            .cte("opened_events")
        )
        written = (
            select(cast(func.count(), Integer))
            .where(services.c.binding_id == created.c.binding_id)
            .scalar_subquery()
        )
        return CreatedWrites([opened, entitled, reserved_cte, events], written)

    async def created_done(self, session: AsyncSession, binding: BindingFacts, marker: Any) -> None:
        """Wakes, on commit, whoever waits for what created_writes wrote."""
        topics = self._created_topics(binding, marker)
        if topics:
            await self._notify.publish(session, *topics)

    def created_committed(self, binding: BindingFacts, marker: Any) -> None:
        """Wakes at once whoever waits for what created_writes wrote and
        what has just committed outside a session."""
        topics = self._created_topics(binding, marker)
        if topics:
            self._notify.committed(*topics)

    @staticmethod
    def _created_topics(binding: BindingFacts, marker: Any) -> tuple[str, ...]:
        if not marker:
            return ()
        return (
            feed_topic(binding.device_digest),
            instructions_topic(binding.partner_id),
        )

    async def _revoked(self, session: AsyncSession, binding: BindingFacts, reason: str) -> None:
        entitlements = list(
            await session.scalars(
                select(Entitlement)
                .where(Entitlement.binding_id == binding.binding_id, Entitlement.state != REVOKED)
                .order_by(Entitlement.service_id)
                .with_for_update()
            )
        )
        for ent in entitlements:
            # A service the partner refused to open has nothing to close.
            if ent.state != FAILED:
                session.add(new_instruction(binding, ent.service_id, CLOSE))
            ent.state = REVOKED
            ent.reason = reason
            ent.update_time = utcnow()
        await entitlement_feed.record(session, self._notify, entitlements)
        if entitlements:
            await self._notify.publish(session, instructions_topic(binding.partner_id))
