"""gRPC face of tether.admin.v1.Admin: messages in, domain calls, messages out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from tether.admin.v1 import messages_pb2 as pb
from tether.admin.v1 import service_pb2_grpc
from tether.server.admin import service
from tether.server.admin.tables import Credential, Partner, PresetService
from tether.server.components import Component
from tether.server.errors import Violations
from tether.server.runtime import Runtime
from tether.server.transport import idempotency, paging
from tether.server.transport.convert import timestamp
from tether.server.storage.idempotency import Response
from tether.server.transport.principal import CallerKind, require

Context = grpc.aio.ServicerContext[Any, Any]

_POLICY_TO_PB = {"refuse": pb.REBIND_POLICY_REFUSE, "move": pb.REBIND_POLICY_MOVE}
_POLICY_FROM_PB = {
    pb.REBIND_POLICY_UNSPECIFIED: "refuse",
    pb.REBIND_POLICY_REFUSE: "refuse",
    pb.REBIND_POLICY_MOVE: "move",
}
_KIND_FROM_PB = {
    pb.CREDENTIAL_KIND_DEVICE: CallerKind.DEVICE,
    pb.CREDENTIAL_KIND_PARTNER: CallerKind.PARTNER,
    pb.CREDENTIAL_KIND_INTERNAL: CallerKind.INTERNAL,
    pb.CREDENTIAL_KIND_ADMIN: CallerKind.ADMIN,
}
_KIND_TO_PB = {v: k for k, v in _KIND_FROM_PB.items()}


def partner_pb(row: Partner) -> pb.Partner:
    return pb.Partner(
        partner_id=row.partner_id,
        display_name=row.display_name,
        rebind_policy=_POLICY_TO_PB[row.rebind_policy],
        create_time=timestamp(row.create_time),
    )


def service_pb(row: PresetService) -> pb.Service:
    return pb.Service(
        partner_id=row.partner_id,
        service_id=row.service_id,
        display_name=row.display_name,
        description=row.description,
        create_time=timestamp(row.create_time),
    )


def credential_pb(row: Credential) -> pb.Credential:
    return pb.Credential(
        credential_id=row.credential_id,
        kind=_KIND_TO_PB[CallerKind(row.kind)],
        partner_id=row.partner_id or "",
        label=row.label,
        create_time=timestamp(row.create_time),
        revoke_time=timestamp(row.revoke_time),
    )


def _policy(value: int, path: str) -> str:
    if value not in _POLICY_FROM_PB:
        violations = Violations()
        violations.add(path, "unknown rebind policy")
        violations.raise_if_any()
    return _POLICY_FROM_PB[value]  # type: ignore[index]


class AdminServicer(service_pb2_grpc.AdminServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._db = runtime.db

    async def _once(
        self,
        method: str,
        request: Message,
        response_type: type[Response],
        work: Callable[[AsyncSession], Awaitable[Response]],
    ) -> Response:
        """An admin-only change, run at most once per request_id."""
        caller = require(CallerKind.ADMIN)
        violations = Violations()
        idempotency.check_request_id(request.request_id, violations)  # type: ignore[attr-defined]
        violations.raise_if_any()
        return await idempotency.Once(self._db, caller, method, request, response_type).run(work)

    async def CreatePartner(
        self, request: pb.CreatePartnerRequest, context: Context
    ) -> pb.CreatePartnerResponse:
        policy = _policy(request.rebind_policy, "rebind_policy")

        async def work(session: AsyncSession) -> pb.CreatePartnerResponse:
            row = await service.create_partner(
                session, request.partner_id, request.display_name, policy
            )
            return pb.CreatePartnerResponse(partner=partner_pb(row))

        return await self._once("CreatePartner", request, pb.CreatePartnerResponse, work)

    async def GetPartner(
        self, request: pb.GetPartnerRequest, context: Context
    ) -> pb.GetPartnerResponse:
        caller = require(CallerKind.ADMIN, CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        async with self._db.sessions() as session:
            row = await service.get_partner(session, partner_id)
        return pb.GetPartnerResponse(partner=partner_pb(row))

    async def ListPartners(
        self, request: pb.ListPartnersRequest, context: Context
    ) -> pb.ListPartnersResponse:
        require(CallerKind.ADMIN, CallerKind.INTERNAL)
        size = paging.page_size(request.page_size)
        after = paging.decode("partners", request.page_token)
        async with self._db.sessions() as session:
            rows = await service.list_partners(session, after, size + 1)
        token = paging.encode("partners", rows[size - 1].partner_id) if len(rows) > size else ""
        return pb.ListPartnersResponse(
            partners=[partner_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def UpdatePartner(
        self, request: pb.UpdatePartnerRequest, context: Context
    ) -> pb.UpdatePartnerResponse:
        require(CallerKind.ADMIN)
        display_name = request.display_name if request.HasField("display_name") else None
        policy = (
            _policy(request.rebind_policy, "rebind_policy")
            if request.HasField("rebind_policy")
            else None
        )
        async with self._db.transaction() as session:
            row = await service.update_partner(session, request.partner_id, display_name, policy)
            return pb.UpdatePartnerResponse(partner=partner_pb(row))

    async def CreateService(
        self, request: pb.CreateServiceRequest, context: Context
    ) -> pb.CreateServiceResponse:
        async def work(session: AsyncSession) -> pb.CreateServiceResponse:
            row = await service.create_service(
                session,
                request.partner_id,
                request.service_id,
                request.display_name,
                request.description,
            )
            return pb.CreateServiceResponse(service=service_pb(row))

        return await self._once("CreateService", request, pb.CreateServiceResponse, work)

    async def ListServices(
        self, request: pb.ListServicesRequest, context: Context
    ) -> pb.ListServicesResponse:
        caller = require(CallerKind.ADMIN, CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        async with self._db.sessions() as session:
            rows = await service.list_services(session, partner_id)
        return pb.ListServicesResponse(services=[service_pb(r) for r in rows])

    async def CreateCredential(
        self, request: pb.CreateCredentialRequest, context: Context
    ) -> pb.CreateCredentialResponse:
        require(CallerKind.ADMIN)
        kind = _KIND_FROM_PB.get(request.kind)
        if kind is None:
            violations = Violations()
            violations.add("kind", "required: device, partner, internal or admin")
            violations.raise_if_any()
            raise AssertionError
        async with self._db.transaction() as session:
            minted = await service.create_credential(
                session, kind, request.partner_id, request.label
            )
            return pb.CreateCredentialResponse(
                credential=credential_pb(minted.credential), token=minted.token
            )

    async def ListCredentials(
        self, request: pb.ListCredentialsRequest, context: Context
    ) -> pb.ListCredentialsResponse:
        require(CallerKind.ADMIN)
        size = paging.page_size(request.page_size)
        scope = f"credentials:{request.partner_id}"
        after = paging.decode(scope, request.page_token)
        async with self._db.sessions() as session:
            rows = await service.list_credentials(session, request.partner_id, after, size + 1)
        token = paging.encode(scope, rows[size - 1].credential_id) if len(rows) > size else ""
        return pb.ListCredentialsResponse(
            credentials=[credential_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def RevokeCredential(
        self, request: pb.RevokeCredentialRequest, context: Context
    ) -> pb.RevokeCredentialResponse:
        require(CallerKind.ADMIN)
        async with self._db.transaction() as session:
            row = await service.revoke_credential(session, request.credential_id)
        self._rt.credentials.forget(row.credential_id)
        return pb.RevokeCredentialResponse(credential=credential_pb(row))


def register(server: grpc.aio.Server, runtime: Runtime) -> Component:
    service_pb2_grpc.add_AdminServicer_to_server(AdminServicer(runtime), server)
    return Component(services=["tether.admin.v1.Admin"])
