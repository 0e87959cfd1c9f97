"""Partner, preset service and credential management, free of gRPC."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import AlreadyExists, NotFound, Violations
from tether.server.shared.partners import Partner, PresetService, get_partner
from tether.server.storage.base import utcnow
from tether.server.transport import credentials, tls
from tether.server.transport.credentials import Credential
from tether.server.transport.principal import CallerKind
from tether.server.validation import check_slug, check_text

REBIND_POLICIES = ("refuse", "move")


async def create_partner(
    session: AsyncSession, partner_id: str, display_name: str, rebind_policy: str
) -> Partner:
    violations = Violations()
    check_slug(partner_id, "partner_id", violations)
    check_text(display_name, "display_name", violations, max_len=200, required=True)
    violations.raise_if_any()
    if await session.get(Partner, partner_id) is not None:
        raise AlreadyExists(
            ErrorReason.ERROR_REASON_PARTNER_ALREADY_EXISTS, f"partner {partner_id!r} exists"
        )
    partner = Partner(
        partner_id=partner_id,
        display_name=display_name,
        rebind_policy=rebind_policy,
        create_time=utcnow(),
    )
    session.add(partner)
    await session.flush()
    return partner


async def list_partners(session: AsyncSession, after: str | None, limit: int) -> list[Partner]:
    query = select(Partner).order_by(Partner.partner_id).limit(limit)
    if after is not None:
        query = query.where(Partner.partner_id > after)
    return list(await session.scalars(query))


async def update_partner(
    session: AsyncSession, partner_id: str, display_name: str | None, rebind_policy: str | None
) -> Partner:
    violations = Violations()
    if display_name is not None:
        check_text(display_name, "display_name", violations, max_len=200, required=True)
    violations.raise_if_any()
    partner = await get_partner(session, partner_id)
    if display_name is not None:
        partner.display_name = display_name
    if rebind_policy is not None:
        partner.rebind_policy = rebind_policy
    await session.flush()
    return partner


async def create_service(
    session: AsyncSession, partner_id: str, service_id: str, display_name: str, description: str
) -> PresetService:
    violations = Violations()
    check_slug(service_id, "service_id", violations)
    check_text(display_name, "display_name", violations, max_len=200, required=True)
    check_text(description, "description", violations, max_len=2000)
    violations.raise_if_any()
    await get_partner(session, partner_id)
    if await session.get(PresetService, (partner_id, service_id)) is not None:
        raise AlreadyExists(
            ErrorReason.ERROR_REASON_SERVICE_ALREADY_EXISTS,
            f"partner {partner_id!r} already has service {service_id!r}",
        )
    service = PresetService(
        partner_id=partner_id,
        service_id=service_id,
        display_name=display_name,
        description=description,
        create_time=utcnow(),
    )
    session.add(service)
    await session.flush()
    return service


async def list_services(session: AsyncSession, partner_id: str) -> list[PresetService]:
    await get_partner(session, partner_id)
    query = (
        select(PresetService)
        .where(PresetService.partner_id == partner_id)
        .order_by(PresetService.service_id)
    )
    return list(await session.scalars(query))


async def create_credential(
    session: AsyncSession, kind: CallerKind, partner_id: str, label: str, client_subject: str = ""
) -> credentials.MintedToken:
    violations = Violations()
    check_text(label, "label", violations, max_len=200)
    if client_subject:
        problem = tls.subject_problem(client_subject)
        if problem is not None:
            violations.add("client_subject", problem)
    if kind is CallerKind.PARTNER and not partner_id:
        violations.add("partner_id", "required for partner credentials")
    if kind is not CallerKind.PARTNER and partner_id:
        violations.add("partner_id", "only partner credentials are scoped to a partner")
    violations.raise_if_any()
    if partner_id:
        await get_partner(session, partner_id)
    minted = credentials.mint(
        kind, partner_id or None, label, tls.normalize_subject(client_subject) or None
    )
    session.add(minted.credential)
    await session.flush()
    return minted


async def list_credentials(
    session: AsyncSession, partner_id: str, after: str | None, limit: int
) -> list[Credential]:
    query = select(Credential).order_by(Credential.credential_id).limit(limit)
    if partner_id:
        query = query.where(Credential.partner_id == partner_id)
    if after is not None:
        query = query.where(Credential.credential_id > after)
    return list(await session.scalars(query))


async def revoke_credential(session: AsyncSession, credential_id: str) -> Credential:
    row = await session.get(Credential, credential_id) if credential_id else None
    if row is None:
        raise NotFound(
            ErrorReason.ERROR_REASON_CREDENTIAL_NOT_FOUND, f"credential {credential_id!r} not found"
        )
    if row.revoke_time is None:
        row.revoke_time = utcnow()
        await session.flush()
    return row
