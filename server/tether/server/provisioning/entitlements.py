"""Entitlement checks: a service is usable only on the bound device, and
only once the partner confirmed it open."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import NotFound
from tether.server.provisioning.tables import ACTIVE, Entitlement
from tether.server.shared.bindings import BindingFacts, BindingReader


async def find(
    session: AsyncSession,
    partner_id: str,
    service_id: str,
    account_digests: list[bytes],
    device_digests: list[bytes],
) -> Entitlement | None:
    """This account's newest entitlement to the service on this device, if any."""
    entitlement: Entitlement | None = await session.scalar(
        select(Entitlement)
        .where(
            Entitlement.partner_id == partner_id,
            Entitlement.service_id == service_id,
            Entitlement.account_digest.in_(account_digests),
            Entitlement.device_digest.in_(device_digests),
        )
        .order_by(Entitlement.update_time.desc())
        .limit(1)
    )
    return entitlement


def is_usable(entitlement: Entitlement | None) -> bool:
    return entitlement is not None and entitlement.state == ACTIVE


async def of_binding(
    session: AsyncSession, bindings: BindingReader, binding_id: uuid.UUID, service_id: str
) -> tuple[BindingFacts, Entitlement]:
    """The binding (read through the binding area's reader) and its
    entitlement to the service; NotFound if either is missing."""
    binding = await bindings(session, binding_id)
    if binding is None:
        raise NotFound(
            ErrorReason.ERROR_REASON_BINDING_NOT_FOUND, f"binding {binding_id} not found"
        )
    entitlement = await session.get(Entitlement, (binding_id, service_id))
    if entitlement is None:
        raise NotFound(
            ErrorReason.ERROR_REASON_ENTITLEMENT_NOT_FOUND,
            f"binding {binding_id} has no service {service_id!r}",
        )
    return binding, entitlement
