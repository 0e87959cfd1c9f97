"""Admin: partners, services and credentials through the real gRPC interface."""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import event

from tests.support import RunningServer, expect_error
from tether.admin.v1 import messages_pb2 as pb
from tether.admin.v1 import service_pb2_grpc
from tether.clients.paging import every
from tether.server.storage import migrate
from tether.server.storage.database import Database
from tether.server.transport.credentials import CredentialVerifier, create_admin
from tether.server.transport.principal import CallerKind


async def test_partner_is_created_once_and_readable(pg_server: RunningServer) -> None:
    admin = pg_server.admin()
    request = pb.CreatePartnerRequest(
        request_id="r1-" + secrets.token_hex(4),
        partner_id="acme-" + secrets.token_hex(3),
        display_name="ACME Mobile",
        rebind_policy=pb.REBIND_POLICY_MOVE,
    )
    first = await admin.CreatePartner(request)
    again = await admin.CreatePartner(request)
    assert again == first
    got = await admin.GetPartner(pb.GetPartnerRequest(partner_id=request.partner_id))
    assert got.partner.rebind_policy == pb.REBIND_POLICY_MOVE
    assert got.partner.display_name == "ACME Mobile"


async def test_reused_request_id_with_other_body_is_refused(pg_server: RunningServer) -> None:
    admin = pg_server.admin()
    request_id = secrets.token_hex(6)
    await admin.CreatePartner(
        pb.CreatePartnerRequest(
            request_id=request_id, partner_id="first-" + request_id, display_name="First"
        )
    )
    await expect_error(
        admin.CreatePartner(
            pb.CreatePartnerRequest(
                request_id=request_id, partner_id="second-" + request_id, display_name="Second"
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ERROR_REASON_REQUEST_ID_REUSED",
    )
    await expect_error(
        admin.GetPartner(pb.GetPartnerRequest(partner_id="second-" + request_id)),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_PARTNER_NOT_FOUND",
    )


async def test_bad_partner_fields_are_all_reported(pg_server: RunningServer) -> None:
    detail = await expect_error(
        pg_server.admin().CreatePartner(
            pb.CreatePartnerRequest(request_id="", partner_id="good-id", display_name="")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"request_id"}
    # A malformed id is refused before anything else is looked at.
    detail = await expect_error(
        pg_server.admin().CreatePartner(
            pb.CreatePartnerRequest(request_id="", partner_id="Bad Id!", display_name="")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"partner_id"}
    detail = await expect_error(
        pg_server.admin().CreatePartner(
            pb.CreatePartnerRequest(request_id="x", partner_id="", display_name="")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"partner_id", "display_name"}


async def test_missing_or_wrong_credential_is_unauthenticated(pg_server: RunningServer) -> None:
    for token in ("", "nonsense", "cred_0000000000000000.secret"):
        stub = service_pb2_grpc.AdminStub(pg_server.channel(token))
        await expect_error(
            stub.ListPartners(pb.ListPartnersRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
            "ERROR_REASON_CREDENTIAL_INVALID",
        )


async def test_partner_sees_only_itself(pg_server: RunningServer) -> None:
    mine, token = await pg_server.partner()
    other, _ = await pg_server.partner()
    stub = service_pb2_grpc.AdminStub(pg_server.channel(token))
    own = await stub.GetPartner(pb.GetPartnerRequest())
    assert own.partner.partner_id == mine
    await expect_error(
        stub.GetPartner(pb.GetPartnerRequest(partner_id=other)),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_PARTNER_NOT_FOUND",
    )
    await expect_error(
        stub.ListPartners(pb.ListPartnersRequest()),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_CALLER_NOT_ALLOWED",
    )


async def test_revoked_credential_stops_working(pg_server: RunningServer) -> None:
    token = await pg_server.credential("internal")
    stub = service_pb2_grpc.AdminStub(pg_server.channel(token))
    await stub.ListPartners(pb.ListPartnersRequest(page_size=1))
    await pg_server.admin().RevokeCredential(
        pb.RevokeCredentialRequest(credential_id=token.split(".")[0])
    )
    await expect_error(
        stub.ListPartners(pb.ListPartnersRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_CREDENTIAL_INVALID",
    )


async def test_partners_page_through_in_order(pg_server: RunningServer) -> None:
    for _ in range(3):
        await pg_server.partner(services=())
    admin = pg_server.admin()
    seen = [
        partner.partner_id
        async for partner in every(
            lambda token: admin.ListPartners(pb.ListPartnersRequest(page_size=2, page_token=token)),
            lambda page: page.partners,
        )
    ]
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) >= 3
    # Garbage, and a forged token of JSON nested deeper than the parser goes.
    nested = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    for token in ("garbage", nested):
        await expect_error(
            admin.ListPartners(pb.ListPartnersRequest(page_token=token)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_PAGE_TOKEN_INVALID",
        )


async def test_concurrent_calls_with_a_cold_cache_share_one_credential_read(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    await migrate.upgrade_async(url)
    db = Database(url)
    try:
        token = await create_admin(db, "test")
        reads = 0

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            nonlocal reads
            reads += "FROM credentials" in statement

        event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        verifier = CredentialVerifier(db, cache_seconds=60)
        principals = await asyncio.gather(*(verifier.authenticate(token) for _ in range(50)))
        assert {p.kind if p else None for p in principals} == {CallerKind.ADMIN}
        assert reads == 1
    finally:
        await db.close()
