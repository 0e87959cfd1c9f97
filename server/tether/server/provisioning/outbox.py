"""The transactional outbox: instructions written with the binding change.

The binding area calls `BindingOutbox.on_change` (its change hook, which
app.py hands the outbox to) inside the transaction of every created and
revoked binding. Everything written here commits or rolls
back with the binding itself: a binding never exists without its "open"
instructions, nor a revocation without its "close" ones.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.observability import propagation
from tether.server.provisioning import entitlement_feed
from tether.server.provisioning.tables import (
    ACTIVATING,
    CLOSE,
    FAILED,
    OPEN,
    PENDING,
    REVOKED,
    Entitlement,
    Instruction,
)
from tether.server.provisioning.wakeup import Wakeup, instructions_topic
from tether.server.shared.bindings import BindingChange, BindingFacts
from tether.server.shared.partners import PresetService
from tether.server.storage.base import utcnow


def new_instruction(
    binding: BindingFacts, service_id: str, kind: str, trace_parent: str = ""
) -> Instruction:
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
        trace_parent=trace_parent,
    )


class BindingOutbox:
    """The binding listener of the provisioning area. On PostgreSQL the
    store's PostgresBindingOutbox also writes it as part of a report's one
    statement (a SqlBindingListener)."""

    def __init__(self, notify: Wakeup) -> None:
        self._notify = notify
        # The writing call's traceparent (None: not traced).
        self._trace_parent = propagation.traceparent_source()

    def _current_trace(self) -> str:
        return self._trace_parent() if self._trace_parent is not None else ""

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
            session.add(new_instruction(binding, service_id, OPEN, self._current_trace()))
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
                session.add(new_instruction(binding, ent.service_id, CLOSE, self._current_trace()))
            ent.state = REVOKED
            ent.reason = reason
            ent.update_time = utcnow()
        await entitlement_feed.record(session, self._notify, entitlements)
        if entitlements:
            await self._notify.publish(session, instructions_topic(binding.partner_id))
