"""gRPC face of tether.admin.v1.Admin: checks the caller, translates
messages (convert.py), calls the domain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from tether.admin.v1 import messages_pb2 as pb
from tether.admin.v1 import service_pb2, service_pb2_grpc
from tether.server.admin import convert, service
from tether.server.errors import Violations
from tether.server.runtime import Runtime
from tether.server.shared.partners import get_partner
from tether.server.storage.idempotency import Once, Response
from tether.server.transport import paging
from tether.server.transport.principal import CallerKind, require
from tether.server.transport.request_ids import check_request_id

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminServicer(service_pb2_grpc.AdminServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._credentials = runtime.credentials

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
        check_request_id(request.request_id, violations)  # type: ignore[attr-defined]
        violations.raise_if_any()
        return await Once(self._db, caller, method, request, response_type).run(work)

    async def CreatePartner(
        self, request: pb.CreatePartnerRequest, context: Context
    ) -> pb.CreatePartnerResponse:
        policy = convert.policy(request.rebind_policy, "rebind_policy")

        async def work(session: AsyncSession) -> pb.CreatePartnerResponse:
            row = await service.create_partner(
                session, request.partner_id, request.display_name, policy
            )
            return pb.CreatePartnerResponse(partner=convert.partner_pb(row))

        return await self._once("CreatePartner", request, pb.CreatePartnerResponse, work)

    async def GetPartner(
        self, request: pb.GetPartnerRequest, context: Context
    ) -> pb.GetPartnerResponse:
        caller = require(CallerKind.ADMIN, CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        async with self._db.sessions() as session:
            row = await get_partner(session, partner_id)
        return pb.GetPartnerResponse(partner=convert.partner_pb(row))

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
            partners=[convert.partner_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def UpdatePartner(
        self, request: pb.UpdatePartnerRequest, context: Context
    ) -> pb.UpdatePartnerResponse:
        require(CallerKind.ADMIN)
        display_name = request.display_name if request.HasField("display_name") else None
        policy = (
            convert.policy(request.rebind_policy, "rebind_policy")
            if request.HasField("rebind_policy")
            else None
        )
        async with self._db.transaction() as session:
            row = await service.update_partner(session, request.partner_id, display_name, policy)
            return pb.UpdatePartnerResponse(partner=convert.partner_pb(row))

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
            return pb.CreateServiceResponse(service=convert.service_pb(row))

        return await self._once("CreateService", request, pb.CreateServiceResponse, work)

    async def ListServices(
        self, request: pb.ListServicesRequest, context: Context
    ) -> pb.ListServicesResponse:
        caller = require(CallerKind.ADMIN, CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        async with self._db.sessions() as session:
            rows = await service.list_services(session, partner_id)
        return pb.ListServicesResponse(services=[convert.service_pb(r) for r in rows])

    async def CreateCredential(
        self, request: pb.CreateCredentialRequest, context: Context
    ) -> pb.CreateCredentialResponse:
        require(CallerKind.ADMIN)
        kind = convert.KINDS.get(request.kind)
        if kind is None:
            violations = Violations()
            violations.add("kind", "required: device, partner, internal or admin")
            violations.raise_if_any()
            raise AssertionError
        async with self._db.transaction() as session:
            minted = await service.create_credential(
                session, kind, request.partner_id, request.label, request.client_subject
            )
            return pb.CreateCredentialResponse(
                credential=convert.credential_pb(minted.credential), token=minted.token
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
            credentials=[convert.credential_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def RevokeCredential(
        self, request: pb.RevokeCredentialRequest, context: Context
    ) -> pb.RevokeCredentialResponse:
        require(CallerKind.ADMIN)
        async with self._db.transaction() as session:
            row = await service.revoke_credential(session, request.credential_id)
        self._credentials.forget(row.credential_id)
        return pb.RevokeCredentialResponse(credential=convert.credential_pb(row))
