"""ReportAccountUse: binding accounts to devices, per partner, under races."""

from __future__ import annotations

import asyncio
import secrets
import time
import types as types_module
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from tests import binding_support as bs
from tests.support import RunningServer, expect_error, start_server
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.binding.v1 import messages_pb2 as pb
from tether.common.v1 import types_pb2 as types
from tether.server.binding import rate_limit
from tether.server.shared.bindings import BindingChange

BOUND = pb.REPORT_OUTCOME_BOUND
ALREADY = pb.REPORT_OUTCOME_ALREADY_BOUND
NOT_ELIGIBLE = pb.REPORT_OUTCOME_NOT_ELIGIBLE
OTHER = pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE
MOVED = pb.REPORT_OUTCOME_MOVED


@pytest.fixture
async def device_token(any_server: RunningServer) -> str:
    return await any_server.credential("device")


def outcomes(response: pb.ReportAccountUseResponse) -> dict[str, int]:
    return {o.partner_id: o.outcome for o in response.outcomes}


async def test_listed_account_is_bound_and_a_retry_gets_the_first_answer(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.phone_account()
    await bs.add_accounts(any_server, partner_token, [account], reference="cust-1")
    devices = bs.stub(any_server, device_token)
    request = bs.report_request(bs.device(), account)

    first = await devices.ReportAccountUse(request)
    again = await devices.ReportAccountUse(request)

    assert again == first
    assert outcomes(first) == {partner_id: BOUND}
    binding = first.outcomes[0].binding
    assert binding.state == pb.BINDING_STATE_ACTIVE
    assert binding.partner_reference == "cust-1"
    assert len(binding.account_digest) == 64
    assert await bs.count_bindings(any_server, partner_id) == 1


async def test_other_spellings_of_the_number_and_imei_find_the_same_binding(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    await bs.add_accounts(any_server, partner_token, [bs.phone_account("+4915112345678")])
    imei = bs.imei()
    devices = bs.stub(any_server, device_token)
    await devices.ReportAccountUse(bs.report_request(bs.device(imei), bs.phone_account()))
    first = await devices.ReportAccountUse(
        bs.report_request(bs.device(imei), bs.phone_account("+4915112345678"))
    )
    national = types.Account(
        kind=types.ACCOUNT_KIND_PHONE_NUMBER, value="0151 1234 5678", region_hint="DE"
    )
    spaced_imei = f"{imei[:2]} {imei[2:8]}-{imei[8:]}"
    second = await devices.ReportAccountUse(bs.report_request(bs.device(spaced_imei), national))
    assert outcomes(first) == {partner_id: BOUND}
    assert outcomes(second) == {partner_id: ALREADY}
    assert second.outcomes[0].binding.binding_id == first.outcomes[0].binding.binding_id


async def test_each_partner_gets_its_own_outcome(
    any_server: RunningServer, device_token: str
) -> None:
    holding, holding_token = await any_server.partner()
    named_only, _ = await any_server.partner()
    refusing, refusing_token = await any_server.partner()
    unrelated, _ = await any_server.partner()
    account = bs.member()
    await bs.add_accounts(any_server, holding_token, [account])
    await bs.add_accounts(any_server, refusing_token, [account])
    devices = bs.stub(any_server, device_token)
    first_device, second_device = bs.device(), bs.device()
    await devices.ReportAccountUse(bs.report_request(first_device, account, [refusing]))

    response = await devices.ReportAccountUse(
        bs.report_request(second_device, account, [holding, named_only, refusing])
    )
    assert outcomes(response) == {holding: BOUND, named_only: NOT_ELIGIBLE, refusing: OTHER}
    assert [o.partner_id for o in response.outcomes] == sorted([holding, named_only, refusing])
    refused = next(o for o in response.outcomes if o.partner_id == refusing)
    assert not refused.HasField("binding")

    # Unnamed: only partners whose list holds the account answer.
    response = await devices.ReportAccountUse(bs.report_request(second_device, account))
    assert outcomes(response) == {holding: ALREADY, refusing: OTHER}
    assert unrelated not in outcomes(response)
    assert await bs.count_bindings(any_server, refusing) == 1


async def test_unlisted_account_binds_nothing(any_server: RunningServer, device_token: str) -> None:
    partner_id, _ = await any_server.partner()
    response = await bs.stub(any_server, device_token).ReportAccountUse(
        bs.report_request(bs.device(), bs.member())
    )
    assert list(response.outcomes) == []
    assert await bs.count_bindings(any_server, partner_id, active_only=False) == 0


class Recorder:
    """A binding listener that records what it was told, inside the transaction."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str, bool]] = []

    async def __call__(self, session: AsyncSession, change: BindingChange) -> None:
        self.changes.append(
            (change.change, str(change.binding.binding_id), change.reason, session.in_transaction())
        )


@pytest.fixture
async def recorder(any_server: RunningServer) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    any_server.app.areas.binding.changes.listen(recorder)
    yield recorder
    any_server.app.areas.binding.changes.forget(recorder)


async def test_move_policy_revokes_the_old_binding_and_tells_the_listeners(
    any_server: RunningServer, device_token: str, recorder: Recorder
) -> None:
    partner_id, partner_token = await any_server.partner(rebind_policy=admin_pb.REBIND_POLICY_MOVE)
    account = bs.phone_account()
    await bs.add_accounts(any_server, partner_token, [account])
    devices = bs.stub(any_server, device_token)
    old_device, new_device = bs.device(), bs.device()
    first = await devices.ReportAccountUse(bs.report_request(old_device, account))
    moved = await devices.ReportAccountUse(bs.report_request(new_device, account))

    assert outcomes(moved) == {partner_id: MOVED}
    old_id = first.outcomes[0].binding.binding_id
    new_id = moved.outcomes[0].binding.binding_id
    assert new_id != old_id
    old = await bs.stub(any_server, partner_token).GetBinding(
        pb.GetBindingRequest(binding_id=old_id)
    )
    assert old.binding.state == pb.BINDING_STATE_REVOKED
    assert old.binding.HasField("revoke_time")
    assert await bs.count_bindings(any_server, partner_id) == 1
    mine = [c for c in recorder.changes if c[1] in (old_id, new_id)]
    assert mine == [
        ("created", old_id, "", True),
        ("revoked", old_id, "moved", True),
        ("created", new_id, "", True),
    ]


async def test_an_account_without_a_reference_goes_to_the_partner_as_its_entry_id(
    any_server: RunningServer, device_token: str
) -> None:
    _, partner_token = await any_server.partner()
    account = bs.phone_account()
    await bs.add_accounts(any_server, partner_token, [account])
    listed = await bs.stub(any_server, partner_token).ListEligibleAccounts(
        pb.ListEligibleAccountsRequest()
    )
    (entry,) = listed.entries
    report = await bs.stub(any_server, device_token).ReportAccountUse(
        bs.report_request(bs.device(), account)
    )
    assert report.outcomes[0].binding.partner_reference == entry.entry_id


async def test_a_device_that_unbound_does_not_get_back_the_account_bound_elsewhere_since(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.phone_account()
    await bs.add_accounts(any_server, partner_token, [account])
    devices = bs.stub(any_server, device_token)
    first_device, second_device = bs.device(), bs.device()
    first = await devices.ReportAccountUse(bs.report_request(first_device, account))
    await devices.Unbind(
        pb.UnbindRequest(
            request_id=secrets.token_hex(6),
            binding_id=first.outcomes[0].binding.binding_id,
            device=first_device,
        )
    )
    second = await devices.ReportAccountUse(bs.report_request(second_device, account))
    assert outcomes(second) == {partner_id: BOUND}
    # Its own revoked binding is history, not a binding to its device.
    again = await devices.ReportAccountUse(bs.report_request(first_device, account))
    assert outcomes(again) == {partner_id: OTHER}
    assert await bs.count_bindings(any_server, partner_id) == 1


async def test_a_failing_listener_rolls_the_binding_back(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.member()
    await bs.add_accounts(any_server, partner_token, [account])

    async def failing(session: AsyncSession, change: BindingChange) -> None:
        raise RuntimeError("outbox unavailable")

    changes = any_server.app.areas.binding.changes
    changes.listen(failing)
    try:
        await expect_error(
            bs.stub(any_server, device_token).ReportAccountUse(
                bs.report_request(bs.device(), account)
            ),
            grpc.StatusCode.INTERNAL,
        )
    finally:
        changes.forget(failing)
    assert await bs.count_bindings(any_server, partner_id, active_only=False) == 0


@pytest.mark.parametrize(
    "policy", [admin_pb.REBIND_POLICY_REFUSE, admin_pb.REBIND_POLICY_MOVE], ids=["refuse", "move"]
)
async def test_200_devices_reporting_one_account_at_once_leave_one_active_binding(
    any_server: RunningServer, device_token: str, policy: admin_pb.RebindPolicy.ValueType
) -> None:
    partner_id, partner_token = await any_server.partner(rebind_policy=policy)
    account = bs.phone_account()
    await bs.add_accounts(any_server, partner_token, [account])
    devices = bs.stub(any_server, device_token)

    responses = await asyncio.gather(
        *(devices.ReportAccountUse(bs.report_request(bs.device(), account)) for _ in range(200))
    )

    results = [r.outcomes[0].outcome for r in responses]
    assert await bs.count_bindings(any_server, partner_id) == 1
    if policy == admin_pb.REBIND_POLICY_REFUSE:
        assert results.count(BOUND) == 1
        assert results.count(OTHER) == 199
        assert await bs.count_bindings(any_server, partner_id, active_only=False) == 1
    else:
        assert results.count(BOUND) == 1
        assert results.count(MOVED) == 199
        assert await bs.count_bindings(any_server, partner_id, active_only=False) == 200


async def test_reused_request_id_with_another_body_is_refused(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    first_account, second_account = bs.member(), bs.member()
    await bs.add_accounts(any_server, partner_token, [first_account, second_account])
    devices = bs.stub(any_server, device_token)
    request = bs.report_request(bs.device(), first_account)
    await devices.ReportAccountUse(request)
    other = pb.ReportAccountUseRequest()
    other.CopyFrom(request)
    other.account.CopyFrom(second_account)
    await expect_error(
        devices.ReportAccountUse(other),
        grpc.StatusCode.ALREADY_EXISTS,
        "ERROR_REASON_REQUEST_ID_REUSED",
    )
    assert await bs.count_bindings(any_server, partner_id) == 1


def _imei(value: str) -> Callable[[pb.ReportAccountUseRequest], None]:
    def change(request: pb.ReportAccountUseRequest) -> None:
        request.device.terminal_id = value

    return change


def _account(kind: int, value: str) -> Callable[[pb.ReportAccountUseRequest], None]:
    def change(request: pb.ReportAccountUseRequest) -> None:
        request.account.kind = kind  # type: ignore[assignment]
        request.account.value = value

    return change


def _partner(value: str) -> Callable[[pb.ReportAccountUseRequest], None]:
    def change(request: pb.ReportAccountUseRequest) -> None:
        request.partner_ids.append(value)

    return change


def _no_request_id(request: pb.ReportAccountUseRequest) -> None:
    request.request_id = ""


PHONE = types.ACCOUNT_KIND_PHONE_NUMBER
BAD_REPORTS: dict[str, tuple[Callable[[pb.ReportAccountUseRequest], None], set[str]]] = {
    "imei-check-digit": (_imei("490154203237519"), {"device.terminal_id"}),
    "imei-too-short": (_imei("4901542"), {"device.terminal_id"}),
    "imei-letters": (_imei("49015420323751A"), {"device.terminal_id"}),
    "phone-too-short": (_account(PHONE, "+4912"), {"account.value"}),
    "phone-letters": (_account(PHONE, "call me"), {"account.value"}),
    "phone-national-without-region": (_account(PHONE, "01511234567"), {"account.value"}),
    "empty-value": (_account(types.ACCOUNT_KIND_MEMBER_ID, ""), {"account.value"}),
    "oversized-value": (_account(types.ACCOUNT_KIND_MEMBER_ID, "m" * 300), {"account.value"}),
    "bad-email": (_account(types.ACCOUNT_KIND_EMAIL, "not-an-address"), {"account.value"}),
    "no-kind": (_account(types.ACCOUNT_KIND_UNSPECIFIED, "abc"), {"account.kind"}),
    "bad-partner-id": (_partner("Not A Slug"), {"partner_ids[1]"}),
    "no-request-id": (_no_request_id, {"request_id"}),
}


@pytest.mark.parametrize("case", list(BAD_REPORTS))
async def test_bad_report_is_invalid_argument_and_binds_nothing(
    any_server: RunningServer, device_token: str, case: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.member()
    await bs.add_accounts(any_server, partner_token, [account])
    request = bs.report_request(bs.device(), account, [partner_id])
    change, fields = BAD_REPORTS[case]
    change(request)
    detail = await expect_error(
        bs.stub(any_server, device_token).ReportAccountUse(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == fields
    assert await bs.count_bindings(any_server, partner_id, active_only=False) == 0


async def test_missing_device_and_account_are_both_reported(
    any_server: RunningServer, device_token: str
) -> None:
    detail = await expect_error(
        bs.stub(any_server, device_token).ReportAccountUse(
            pb.ReportAccountUseRequest(request_id="r")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"device", "account"}


async def test_unknown_partner_is_not_found_and_binds_nothing(
    any_server: RunningServer, device_token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.member()
    await bs.add_accounts(any_server, partner_token, [account])
    detail = await expect_error(
        bs.stub(any_server, device_token).ReportAccountUse(
            bs.report_request(bs.device(), account, [partner_id, "no-such-partner"])
        ),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_PARTNER_NOT_FOUND",
    )
    assert detail.metadata == {"partner_id": "no-such-partner"}
    assert await bs.count_bindings(any_server, partner_id, active_only=False) == 0


@pytest.mark.parametrize("kind", ["partner", "internal", "admin"])
async def test_only_device_credentials_may_report(any_server: RunningServer, kind: str) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.member()
    await bs.add_accounts(any_server, partner_token, [account])
    token = {
        "partner": partner_token,
        "admin": any_server.admin_token,
        "internal": await any_server.credential("internal") if kind == "internal" else "",
    }[kind]
    await expect_error(
        bs.stub(any_server, token).ReportAccountUse(bs.report_request(bs.device(), account)),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_CALLER_NOT_ALLOWED",
    )
    assert await bs.count_bindings(any_server, partner_id, active_only=False) == 0


@pytest.mark.parametrize("token", ["", "garbage", "cred_0123456789abcdef.wrong-secret"])
async def test_missing_or_invalid_credential_is_unauthenticated(
    any_server: RunningServer, token: str
) -> None:
    partner_id, partner_token = await any_server.partner()
    account = bs.member()
    await bs.add_accounts(any_server, partner_token, [account])
    await expect_error(
        bs.stub(any_server, token).ReportAccountUse(bs.report_request(bs.device(), account)),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_CREDENTIAL_INVALID",
    )
    assert await bs.count_bindings(any_server, partner_id, active_only=False) == 0


@pytest.fixture
def pinned_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds the rate limiter's clock still, so no window ends during a test."""
    now = time.time()
    monkeypatch.setattr(rate_limit, "time", types_module.SimpleNamespace(time=lambda: now))


async def test_reports_of_one_device_are_rate_limited(
    pg_server: RunningServer, pinned_window: None
) -> None:
    token = await pg_server.credential("device")
    devices = bs.stub(pg_server, token)
    dev = bs.device()
    limit = pg_server.app.settings.report_rate_per_minute
    accepted = 0
    for _ in range(limit + 1):
        try:
            await devices.ReportAccountUse(bs.report_request(dev, bs.member()))
        except grpc.aio.AioRpcError:
            break
        accepted += 1
    assert accepted == limit
    detail = await expect_error(
        devices.ReportAccountUse(bs.report_request(dev, bs.member())),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ERROR_REASON_RATE_LIMITED",
    )
    assert detail.retry_after_seconds is not None
    assert 0 < detail.retry_after_seconds <= 60
    # Another device of the same credential is not affected.
    await devices.ReportAccountUse(bs.report_request(bs.device(), bs.member()))


async def test_every_rate_window_expires_from_its_first_report(
    pg_server: RunningServer, redis_url: str
) -> None:
    devices = bs.stub(pg_server, await pg_server.credential("device"))
    await devices.ReportAccountUse(bs.report_request(bs.device(), bs.member()))
    client = redis.Redis.from_url(redis_url)
    try:
        windows = [k async for k in client.scan_iter(match="*:rate:report:*")]
        assert windows
        for key in windows:
            assert 0 < await client.pttl(key) <= rate_limit.WINDOW_MS
    finally:
        await client.aclose()


async def test_a_rate_of_zero_turns_the_limit_off(redis_url: str, tmp_path: Path) -> None:
    server = await start_server(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}",
        redis_url=redis_url,
        data_dir=tmp_path,
        report_rate_per_minute=0,
    )
    try:
        devices = bs.stub(server, await server.credential("device"))
        dev = bs.device()
        for _ in range(3):
            await devices.ReportAccountUse(bs.report_request(dev, bs.member()))
    finally:
        await server.stop()


async def test_a_rate_limited_report_binds_nothing(
    pg_server: RunningServer, pinned_window: None
) -> None:
    partner_id, partner_token = await pg_server.partner()
    account = bs.phone_account()
    await bs.add_accounts(pg_server, partner_token, [account])
    devices = bs.stub(pg_server, await pg_server.credential("device"))
    dev = bs.device()
    limit = pg_server.app.settings.report_rate_per_minute
    for _ in range(limit):
        await devices.ReportAccountUse(bs.report_request(dev, bs.member()))
    await expect_error(
        devices.ReportAccountUse(bs.report_request(dev, account)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ERROR_REASON_RATE_LIMITED",
    )
    assert await bs.count_bindings(pg_server, partner_id, active_only=False) == 0


async def _outbox_rows(server: RunningServer, binding_id: str) -> list[tuple[object, ...]]:
    """What the outbox wrote for one binding, without generated ids and times."""
    statement = text(
        "SELECT 'instruction', i.service_id, i.kind, i.state, "
        "i.partner_reference = (SELECT partner_reference FROM bindings WHERE binding_id = :b), "
        "i.account_kind, i.attempts, i.last_error, NULL::bigint "
        "FROM provisioning_instructions i WHERE i.binding_id = :b "
        "UNION ALL SELECT 'entitlement', e.service_id, e.state, e.reason, "
        "e.partner_id = (SELECT partner_id FROM bindings WHERE binding_id = :b), "
        "e.account_kind, NULL, NULL, NULL FROM entitlements e WHERE e.binding_id = :b "
        "UNION ALL SELECT 'event', v.service_id, v.state, v.reason, "
        "v.partner_id = (SELECT partner_id FROM bindings WHERE binding_id = :b), "
        "v.account_kind, NULL, NULL, v.position FROM entitlement_events v WHERE v.binding_id = :b "
        "ORDER BY 1, 2"
    )
    async with server.app.runtime.db.sessions() as session:
        rows = await session.execute(statement, {"b": uuid.UUID(binding_id)})
        return [tuple(row) for row in rows]


async def test_the_one_statement_report_writes_what_the_listeners_write(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner(services=("b-service", "a-service"))
    fused_account, general_account = bs.phone_account(), bs.phone_account()
    await bs.add_accounts(pg_server, partner_token, [fused_account, general_account])
    devices = bs.stub(pg_server, await pg_server.credential("device"))
    device = bs.device()
    fused = await devices.ReportAccountUse(bs.report_request(device, fused_account))
    # A listener that is only a callable sends reports down the general path.
    recorder = Recorder()
    pg_server.app.areas.binding.changes.listen(recorder)
    try:
        general = await devices.ReportAccountUse(bs.report_request(device, general_account))
    finally:
        pg_server.app.areas.binding.changes.forget(recorder)
    assert recorder.changes, "the second report took the general path"

    fused_rows = await _outbox_rows(pg_server, fused.outcomes[0].binding.binding_id)
    general_rows = await _outbox_rows(pg_server, general.outcomes[0].binding.binding_id)
    # The same rows; the device's feed goes on from one report to the next.
    assert [r[:-1] for r in fused_rows] == [r[:-1] for r in general_rows]
    assert [r[-1] for r in fused_rows if r[0] == "event"] == [1, 2]
    assert [r[-1] for r in general_rows if r[0] == "event"] == [3, 4]
    assert len(fused_rows) == 6
    # Instructions carry the binding's reference, the other rows its partner.
    assert all(r[4] for r in fused_rows)
    assert partner_id == fused.outcomes[0].partner_id == general.outcomes[0].partner_id
