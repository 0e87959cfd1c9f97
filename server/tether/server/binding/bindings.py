"""Reading and revoking bindings, with who-may-see-what applied.

Scope is decided by the servicer from the caller; here it arrives as plain
values: the partner a caller is confined to (None: any) and the device a
device caller named (None: not a device caller).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.binding.reports import revoke
from tether.server.binding.tables import ACTIVE, Binding
from tether.server.errors import FailedPrecondition, NotFound, PermissionDenied
from tether.server.shared.bindings import BindingListener
from tether.server.shared.digests import Digester
from tether.server.shared.subjects import Subject


@dataclass(frozen=True)
class Scope:
    # A partner caller sees only this partner's bindings.
    partner_id: str | None = None
    # A device caller acts only on bindings of this device.
    device: Subject | None = None


def _not_found(binding_id: str) -> NotFound:
    return NotFound(ErrorReason.ERROR_REASON_BINDING_NOT_FOUND, f"binding {binding_id!r} not found")


async def find(session: AsyncSession, binding_id: uuid.UUID) -> Binding | None:
    """A binding by id, whoever asks: the read other areas get (a BindingReader)."""
    return await session.get(Binding, binding_id)


async def get(
    session: AsyncSession,
    digester: Digester,
    binding_id: uuid.UUID,
    scope: Scope,
    *,
    for_update: bool = False,
) -> Binding:
    query = select(Binding).where(Binding.binding_id == binding_id)
    if for_update:
        query = query.with_for_update()
    row = await session.scalar(query)
    # Another partner's binding looks exactly like a missing one.
    if row is None or (scope.partner_id is not None and row.partner_id != scope.partner_id):
        raise _not_found(str(binding_id))
    if scope.device is not None and row.device_digest not in scope.device.candidates(digester):
        raise PermissionDenied(
            ErrorReason.ERROR_REASON_BINDING_OF_OTHER_DEVICE,
            "the binding belongs to another device than the one named",
        )
    return row


async def unbind(
    session: AsyncSession,
    digester: Digester,
    binding_id: uuid.UUID,
    scope: Scope,
    listeners: Sequence[BindingListener],
) -> Binding:
    row = await get(session, digester, binding_id, scope, for_update=True)
    if row.state != ACTIVE:
        raise FailedPrecondition(
            ErrorReason.ERROR_REASON_BINDING_REVOKED, f"binding {binding_id} was already revoked"
        )
    revoked = await revoke(session, row.binding_id, "unbound", listeners)
    if revoked is None:
        raise FailedPrecondition(
            ErrorReason.ERROR_REASON_BINDING_REVOKED, f"binding {binding_id} was already revoked"
        )
    return revoked


@dataclass(frozen=True)
class Filter:
    """Whose bindings: set exactly one of device, account or partner_id."""

    device: Subject | None = None
    account: Subject | None = None
    # With account: that partner only ("" or None: any); alone: that partner.
    partner_id: str | None = None
    include_revoked: bool = False


# The keyset of "newest first": (create_time, binding_id), both descending.
PageKey = tuple[datetime, uuid.UUID]


async def list_bindings(
    session: AsyncSession,
    digester: Digester,
    which: Filter,
    *,
    scope: Scope,
    after: PageKey | None,
    limit: int,
) -> list[Binding]:
    query = select(Binding)
    if which.device is not None:
        query = query.where(Binding.device_digest.in_(which.device.candidates(digester)))
    if which.account is not None:
        query = query.where(Binding.account_digest.in_(which.account.candidates(digester)))
    if which.partner_id:
        query = query.where(Binding.partner_id == which.partner_id)
    if scope.partner_id is not None:
        query = query.where(Binding.partner_id == scope.partner_id)
    if not which.include_revoked:
        query = query.where(Binding.state == ACTIVE)
    if after is not None:
        time, binding_id = after
        query = query.where(
            or_(
                Binding.create_time < time,
                and_(Binding.create_time == time, Binding.binding_id < binding_id),
            )
        )
    query = query.order_by(Binding.create_time.desc(), Binding.binding_id.desc()).limit(limit)
    return list(await session.scalars(query))


async def active_by_partner(session: AsyncSession) -> dict[str, int]:
    """Active bindings per partner (the metrics' gauge)."""
    rows = await session.execute(
        select(Binding.partner_id, func.count())
        .where(Binding.state == ACTIVE)
        .group_by(Binding.partner_id)
    )
    return {partner_id: int(count) for partner_id, count in rows.all()}
