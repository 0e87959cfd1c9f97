"""Reading and revoking bindings: who may see and unbind what, and paging."""

from __future__ import annotations

import secrets

import grpc
import pytest

from tests import binding_support as bs
from tests.support import RunningServer, expect_error
from tether.binding.v1 import messages_pb2 as pb
from tether.clients.paging import pages
from tether.common.v1 import types_pb2 as types


@pytest.fixture
async def device_token(any_server: RunningServer) -> str:
    return await any_server.credential("device")


async def bind(
    server: RunningServer, device_token: str, partner_token: str, dev: types.Device
) -> pb.AccountBinding:
    account = bs.member()
    await bs.add_accounts(server, partner_token, [account])
    response = await bs.stub(server, device_token).ReportAccountUse(bs.report_request(dev, account))
    return response.outcomes[0].binding


async def test_partner_device_and_internal_read_a_binding_within_their_scope(
    any_server: RunningServer, device_token: str
) -> None:
    _, partner_token = await any_server.partner()
    _, other_token = await any_server.partner()
    dev = bs.device()
    binding = await bind(any_server, device_token, partner_token, dev)
    request = pb.GetBindingRequest(binding_id=binding.binding_id)

    got = await bs.stub(any_server, partner_token).GetBinding(request)
    assert got.binding == binding
    internal = await any_server.credential("internal")
    assert (await bs.stub(any_server, internal).GetBinding(request)).binding == binding
    by_device = await bs.stub(any_server, device_token).GetBinding(
        pb.GetBindingRequest(binding_id=binding.binding_id, device=dev)
    )
    assert by_device.binding == binding

    await expect_error(
        bs.stub(any_server, other_token).GetBinding(request),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_BINDING_NOT_FOUND",
    )
    await expect_error(
        bs.stub(any_server, device_token).GetBinding(
            pb.GetBindingRequest(binding_id=binding.binding_id, device=bs.device())
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_BINDING_OF_OTHER_DEVICE",
    )
    detail = await expect_error(
        bs.stub(any_server, device_token).GetBinding(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"device"}


async def test_unknown_or_malformed_binding_ids(
    any_server: RunningServer, device_token: str
) -> None:
    internal = await any_server.credential("internal")
    await expect_error(
        bs.stub(any_server, internal).GetBinding(
            pb.GetBindingRequest(binding_id="6a1f3f36-8d2e-4c38-b3a4-2f0d7e0e9c11")
        ),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_BINDING_NOT_FOUND",
    )
    detail = await expect_error(
        bs.stub(any_server, internal).GetBinding(pb.GetBindingRequest(binding_id="nope")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"binding_id"}


async def test_device_unbinds_only_its_own_binding_and_retries_are_safe(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    dev = bs.device()
    binding = await bind(any_server, device_token, partner_token, dev)
    devices = bs.stub(any_server, device_token)
    await expect_error(
        devices.Unbind(
            pb.UnbindRequest(
                request_id=secrets.token_hex(6),
                binding_id=binding.binding_id,
                device=bs.device(),
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_BINDING_OF_OTHER_DEVICE",
    )
    assert await bs.count_bindings(any_server, partner_id) == 1

    request = pb.UnbindRequest(
        request_id=secrets.token_hex(6), binding_id=binding.binding_id, device=dev
    )
    first = await devices.Unbind(request)
    again = await devices.Unbind(request)
    assert again == first
    assert first.binding.state == pb.BINDING_STATE_REVOKED
    assert await bs.count_bindings(any_server, partner_id) == 0
    # A new request for the revoked binding is told so.
    request.request_id = secrets.token_hex(6)
    await expect_error(
        devices.Unbind(request),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_BINDING_REVOKED",
    )


async def test_partner_unbinds_its_own_bindings_only(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    _, other_token = await any_server.partner()
    binding = await bind(any_server, device_token, partner_token, bs.device())
    request = pb.UnbindRequest(request_id=secrets.token_hex(6), binding_id=binding.binding_id)
    await expect_error(
        bs.stub(any_server, other_token).Unbind(request),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_BINDING_NOT_FOUND",
    )
    assert await bs.count_bindings(any_server, partner_id) == 1
    response = await bs.stub(any_server, partner_token).Unbind(request)
    assert response.binding.state == pb.BINDING_STATE_REVOKED
    assert await bs.count_bindings(any_server, partner_id) == 0


async def test_bindings_of_a_device_are_listed_newest_first_page_by_page(
    any_server: RunningServer, device_token: str
) -> None:
    dev = bs.device()
    made = []
    partners = [await any_server.partner() for _ in range(5)]
    for _, partner_token in partners:
        made.append(await bind(any_server, device_token, partner_token, dev))
    devices = bs.stub(any_server, device_token)
    listed = [
        page
        async for page in pages(
            lambda token: devices.ListBindings(
                pb.ListBindingsRequest(device=dev, page_size=2, page_token=token)
            )
        )
    ]
    assert len(listed) == 3
    seen = [binding for page in listed for binding in page.bindings]
    assert [b.binding_id for b in seen] == [b.binding_id for b in reversed(made)]

    # The partner sees only its own binding of the device.
    partner_id, partner_token = partners[0]
    own = await bs.stub(any_server, partner_token).ListBindings(pb.ListBindingsRequest(device=dev))
    assert [b.partner_id for b in own.bindings] == [partner_id]


async def test_partner_lists_its_bindings_and_by_account_but_never_anothers(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    other_id, other_token = await any_server.partner()
    account = bs.phone_account()
    await bs.add_accounts(any_server, partner_token, [account])
    await bs.add_accounts(any_server, other_token, [account])
    await bs.stub(any_server, device_token).ReportAccountUse(
        bs.report_request(bs.device(), account)
    )
    partners = bs.stub(any_server, partner_token)

    mine = await partners.ListBindings(pb.ListBindingsRequest(partner_id=partner_id))
    assert [b.partner_id for b in mine.bindings] == [partner_id]
    implicit = await partners.ListBindings(pb.ListBindingsRequest(partner_id=""))
    assert implicit.bindings == mine.bindings
    by_account = await partners.ListBindings(
        pb.ListBindingsRequest(account=pb.PartnerAccount(account=account))
    )
    assert by_account.bindings == mine.bindings
    for request in (
        pb.ListBindingsRequest(partner_id=other_id),
        pb.ListBindingsRequest(account=pb.PartnerAccount(partner_id=other_id, account=account)),
    ):
        await expect_error(
            partners.ListBindings(request),
            grpc.StatusCode.NOT_FOUND,
            "ERROR_REASON_PARTNER_NOT_FOUND",
        )
    internal = await any_server.credential("internal")
    everyone = await bs.stub(any_server, internal).ListBindings(
        pb.ListBindingsRequest(account=pb.PartnerAccount(account=account))
    )
    assert {b.partner_id for b in everyone.bindings} == {partner_id, other_id}


async def test_device_may_list_only_by_device(any_server: RunningServer, device_token: str) -> None:
    partner_id, _ = await any_server.partner()
    await expect_error(
        bs.stub(any_server, device_token).ListBindings(
            pb.ListBindingsRequest(partner_id=partner_id)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_CALLER_NOT_ALLOWED",
    )


async def test_revoked_bindings_are_listed_on_request_and_tokens_stay_in_their_listing(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    dev = bs.device()
    first = await bind(any_server, device_token, partner_token, dev)
    await bind(any_server, device_token, partner_token, dev)
    partners = bs.stub(any_server, partner_token)
    await partners.Unbind(
        pb.UnbindRequest(request_id=secrets.token_hex(6), binding_id=first.binding_id)
    )
    active = await partners.ListBindings(pb.ListBindingsRequest(partner_id=partner_id))
    assert len(active.bindings) == 1
    page = await partners.ListBindings(
        pb.ListBindingsRequest(partner_id=partner_id, include_revoked=True, page_size=1)
    )
    assert page.next_page_token
    await expect_error(
        partners.ListBindings(
            pb.ListBindingsRequest(partner_id=partner_id, page_token=page.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_PAGE_TOKEN_INVALID",
    )
    rest = await partners.ListBindings(
        pb.ListBindingsRequest(
            partner_id=partner_id, include_revoked=True, page_token=page.next_page_token
        )
    )
    assert [b.binding_id for b in rest.bindings] == [first.binding_id]
    assert not rest.next_page_token


async def test_listing_without_a_filter_is_invalid(any_server: RunningServer) -> None:
    internal = await any_server.credential("internal")
    detail = await expect_error(
        bs.stub(any_server, internal).ListBindings(pb.ListBindingsRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"filter"}
