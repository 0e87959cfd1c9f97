"""A caller's malformed input is INVALID_ARGUMENT (after UNAUTHENTICATED),
never INTERNAL or UNKNOWN, and never reaches the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from structlog.testing import capture_logs

from tests import binding_support as bs
from tests import fuzz_support as fuzz
from tests import provisioning_support as ps
from tests.guard_support import fingerprint
from tests.support import RunningServer, expect_error
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.clients.errors import details_of
from tether.common.v1 import types_pb2 as types_pb
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.guard.v1.service_pb2_grpc import FingerprintGuardStub
from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1 import service_pb2_grpc
from tether.server.transport import request_check

OUT_OF_RANGE = Timestamp(seconds=2**40)

ADMIN = "/tether.admin.v1.Admin/"
BINDING = "/tether.binding.v1.Binding/"
PROVISIONING = "/tether.provisioning.v1.Provisioning/"
NUL = "p\0"
# The calls a fuzzer once saw answer INTERNAL for a NUL byte in an id.
NUL_IN_AN_ID: list[tuple[str, str, Message, str]] = [
    ("admin", ADMIN + "GetPartner", admin_pb.GetPartnerRequest(partner_id=NUL), "partner_id"),
    ("admin", ADMIN + "ListServices", admin_pb.ListServicesRequest(partner_id=NUL), "partner_id"),
    (
        "admin",
        ADMIN + "UpdatePartner",
        admin_pb.UpdatePartnerRequest(partner_id=NUL, display_name="x"),
        "partner_id",
    ),
    (
        "admin",
        ADMIN + "ListCredentials",
        admin_pb.ListCredentialsRequest(partner_id=NUL),
        "partner_id",
    ),
    (
        "admin",
        ADMIN + "CreateCredential",
        admin_pb.CreateCredentialRequest(kind=admin_pb.CREDENTIAL_KIND_PARTNER, partner_id=NUL),
        "partner_id",
    ),
    (
        "admin",
        ADMIN + "RevokeCredential",
        admin_pb.RevokeCredentialRequest(credential_id="cred_\0"),
        "credential_id",
    ),
    (
        "admin",
        BINDING + "AddEligibleAccounts",
        binding_pb.AddEligibleAccountsRequest(partner_id=NUL),
        "partner_id",
    ),
    (
        "admin",
        BINDING + "ListEligibleAccounts",
        binding_pb.ListEligibleAccountsRequest(partner_id=NUL),
        "partner_id",
    ),
    (
        "admin",
        BINDING + "ListBindings",
        binding_pb.ListBindingsRequest(partner_id=NUL),
        "partner_id",
    ),
    ("internal", PROVISIONING + "GetPipeline", pb.GetPipelineRequest(partner_id=NUL), "partner_id"),
    (
        "internal",
        PROVISIONING + "ListInstructions",
        pb.ListInstructionsRequest(partner_id=NUL),
        "partner_id",
    ),
]


async def _raw_call(
    server: RunningServer, path: str, body: bytes, token: str
) -> grpc.aio.AioRpcError:
    channel: Any = server.channel(token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(path)(body, timeout=10)
    return caught.value


async def test_a_nul_byte_in_an_id_is_invalid_argument_naming_the_field(
    pg_server: RunningServer,
) -> None:
    tokens = {
        "admin": pg_server.admin_token,
        "internal": await pg_server.credential("internal"),
    }
    for role, path, request, field in NUL_IN_AN_ID:
        error = await _raw_call(pg_server, path, request.SerializeToString(), tokens[role])
        detail = details_of(error)
        assert detail.code == grpc.StatusCode.INVALID_ARGUMENT, (path, detail.message)
        assert detail.violations == {field: "must not contain a NUL character"}, path


async def test_a_malformed_id_is_refused_before_any_lookup(pg_server: RunningServer) -> None:
    detail = await expect_error(
        pg_server.admin().GetPartner(admin_pb.GetPartnerRequest(partner_id="x" * 5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"partner_id"}
    # Well formed but unknown is still NOT_FOUND.
    await expect_error(
        pg_server.admin().GetPartner(admin_pb.GetPartnerRequest(partner_id="no-such-partner")),
        grpc.StatusCode.NOT_FOUND,
    )


async def _query_usage(
    partner: service_pb2_grpc.ProvisioningAsyncStub,
    bound: ps.Bound,
    start: Timestamp,
    end: Timestamp,
) -> pb.QueryUsageResponse:
    """The partner's usage of the bound device's free-data from start to end."""
    return await partner.QueryUsage(
        pb.QueryUsageRequest(
            service_id="free-data",
            binding_id=bound.binding.binding_id,
            start_time=start,
            end_time=end,
        )
    )


async def test_timestamps_outside_the_protobuf_range_are_invalid_argument(
    pg_server: RunningServer,
) -> None:
    _, partner_token = await pg_server.partner()
    device_token = await pg_server.credential("device")
    bound = await ps.bind(pg_server, device_token, partner_token)
    partner = ps.stub(pg_server, partner_token)
    report = pb.UsageReport(
        binding_id=bound.binding.binding_id,
        service_id="free-data",
        events=[
            pb.UsageEvent(
                occur_time=OUT_OF_RANGE, figure=pb.UsageFigure(metric="bytes", quantity=1)
            )
        ],
    )
    detail = await expect_error(
        partner.ReportUsage(pb.ReportUsageRequest(request_id="r1", report=report)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"report.events[0].occur_time"}
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    for start, end, field in ((OUT_OF_RANGE, now, "start_time"), (now, OUT_OF_RANGE, "end_time")):
        detail = await expect_error(
            _query_usage(partner, bound, start, end),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
        )
        assert set(detail.violations) == {field}
    # The last month a Timestamp holds is a range like any other (its end
    # plus the longest range is past the year 9999: no overflow, no INTERNAL).
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(datetime(9999, 12, 1, tzinfo=UTC))
    end.FromDatetime(datetime(9999, 12, 31, tzinfo=UTC))
    usage = await _query_usage(partner, bound, start, end)
    assert list(usage.days) == []


async def _answer(
    channel: grpc.aio.Channel, rpc: fuzz.Rpc, token: str
) -> tuple[grpc.StatusCode, str]:
    """The server's answer to b'\\xff': on a client stream, a write racing the
    server's early answer loses it on this side, so such a call is repeated."""
    for _ in range(20):
        code, message = await fuzz.call(channel, rpc, [b"\xff"], token, seconds=10)
        if message != fuzz.CLIENT_WRITE_FAILED:
            break
    return code, message


async def test_an_undecodable_body_is_invalid_argument_on_every_method_after_authentication(
    pg_server: RunningServer,
) -> None:
    _, partner_token = await pg_server.partner()
    tokens = [pg_server.admin_token, partner_token, await pg_server.credential("internal")]
    channel = grpc.aio.insecure_channel(pg_server.address)
    try:
        with capture_logs() as logs:
            for rpc in fuzz.rpcs():
                code, _ = await _answer(channel, rpc, "")
                assert code == grpc.StatusCode.UNAUTHENTICATED, rpc.path
                # A caller of the wrong kind may be turned away first; one of
                # the right kind is told the body is bad.
                answers = {}
                for token in tokens:
                    code, message = await _answer(channel, rpc, token)
                    answers[code] = message
                assert grpc.StatusCode.INVALID_ARGUMENT in answers, (rpc.path, answers)
                assert set(answers) <= {
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.PERMISSION_DENIED,
                }, (rpc.path, answers)
                # No internal message type named.
                assert "tether." not in answers[grpc.StatusCode.INVALID_ARGUMENT]
    finally:
        await channel.close()
    worst = {entry["log_level"] for entry in logs}
    assert worst <= {"debug", "info", "warning"}, worst
    assert not [entry for entry in logs if "exc_info" in entry or "exception" in entry]


async def test_a_bad_usage_report_on_the_stream_is_answered_and_the_stream_goes_on(
    pg_server: RunningServer,
) -> None:
    _, partner_token = await pg_server.partner()
    device_token = await pg_server.credential("device")
    bound = await ps.bind(pg_server, device_token, partner_token)
    outgoing: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
    outgoing.put_nowait(pb.ConnectRequest(hello=pb.StreamHello()))

    async def requests() -> AsyncIterator[pb.ConnectRequest]:
        while True:
            yield await outgoing.get()

    call = ps.stub(pg_server, partner_token).Connect(requests())

    async def next_of(kind: str) -> pb.ConnectResponse:
        while True:
            response = await asyncio.wait_for(call.read(), 20)
            assert isinstance(response, pb.ConnectResponse), response
            if response.WhichOneof("message") in (kind, kind + "s"):
                return response

    try:
        await next_of("ready")
        first = await next_of("instruction")
        bad = pb.UsageReport(
            binding_id=bound.binding.binding_id,
            service_id="free-data",
            events=[
                pb.UsageEvent(
                    occur_time=OUT_OF_RANGE, figure=pb.UsageFigure(metric="bytes", quantity=1)
                )
            ],
        )
        # Twice: a partner that resends it must not loop on a dead stream.
        for _ in range(2):
            outgoing.put_nowait(pb.ConnectRequest(usage_report=bad))
            refused = (await next_of("usage_report_refused")).usage_report_refused
            assert refused.binding_id == bound.binding.binding_id
            assert refused.service_id == "free-data"
            assert refused.error_reason == "ERROR_REASON_INVALID_FIELD"
            assert "usage_report.events[0].occur_time" in refused.error_message
        # A report naming an unknown binding is refused the same way.
        now = Timestamp()
        now.FromDatetime(datetime.now(UTC))
        event = pb.UsageEvent(occur_time=now, figure=pb.UsageFigure(metric="bytes", quantity=1))
        outgoing.put_nowait(
            pb.ConnectRequest(
                usage_report=pb.UsageReport(
                    binding_id="00000000-0000-0000-0000-000000000000",
                    service_id="free-data",
                    events=[event],
                )
            )
        )
        refused = (await next_of("usage_report_refused")).usage_report_refused
        assert refused.error_reason != "ERROR_REASON_INVALID_FIELD", refused
        # The stream and its instructions go on.
        await ps.bind(pg_server, device_token, partner_token)
        later = await next_of("instruction")
        assert later != first
        assert not call.done()
    finally:
        call.cancel()


async def test_usage_sums_beyond_int64_are_answered_at_its_largest_value(
    any_server: RunningServer,
) -> None:
    _, partner_token = await any_server.partner()
    device_token = await any_server.credential("device")
    bound = await ps.bind(any_server, device_token, partner_token)
    partner = ps.stub(any_server, partner_token)
    largest = 2**63 - 1
    at = Timestamp()
    at.FromDatetime(datetime.now(UTC))
    for request_id in ("big-1", "big-2"):
        await partner.ReportUsage(
            pb.ReportUsageRequest(
                request_id=request_id,
                report=pb.UsageReport(
                    binding_id=bound.binding.binding_id,
                    service_id="free-data",
                    events=[
                        pb.UsageEvent(
                            occur_time=at, figure=pb.UsageFigure(metric="bytes", quantity=largest)
                        )
                    ],
                ),
            )
        )
    device_usage = await ps.stub(any_server, device_token).QueryDeviceUsage(
        pb.QueryDeviceUsageRequest(
            device=bound.device, binding_id=bound.binding.binding_id, service_id="free-data"
        )
    )
    assert [(f.metric, f.quantity) for f in device_usage.figures] == [("bytes", largest)]
    start = Timestamp(seconds=at.seconds - 3600)
    end = Timestamp(seconds=at.seconds + 3600)
    usage = await _query_usage(partner, bound, start, end)
    assert [(d.metric, d.event_count, d.quantity) for d in usage.days] == [("bytes", 2, largest)]
    assert [(t.metric, t.event_count, t.quantity) for t in usage.totals] == [("bytes", 2, largest)]


def test_every_nul_is_found_wherever_it_sits_in_a_request() -> None:
    parse = request_check.lenient(guard_pb.EvaluateRequest.FromString)
    assert parse is not None
    request = guard_pb.EvaluateRequest(
        service_id="svc-a",
        components=guard_pb.FingerprintComponents(
            fonts=["Arial", "Bad\0Font"], extra={"canvas": "c\0"}
        ),
    )
    refused = parse(request.SerializeToString())
    assert isinstance(refused, request_check.Refused)
    assert {v.field for v in refused.error.violations} == {
        "components.fonts[1]",
        "components.extra['canvas']",
    }
    clean = guard_pb.EvaluateRequest(service_id="svc-a", room_id="room:1")
    assert parse(clean.SerializeToString()) == clean
    refused = parse(guard_pb.EvaluateRequest(service_id="bad service!").SerializeToString())
    assert isinstance(refused, request_check.Refused)
    assert [v.field for v in refused.error.violations] == ["service_id"]
    # A room id keys no look-up: the guard names a bad one with the call's
    # other bad fields.
    odd_room = guard_pb.EvaluateRequest(service_id="svc-a", room_id="bad room!")
    assert parse(odd_room.SerializeToString()) == odd_room


def test_a_body_that_passed_its_checks_is_checked_again_for_another_method() -> None:
    """Bodies that passed are remembered per method (a repeat skips the
    walk), so the same bytes parsed as another type get that type's checks,
    and a refused body is refused every time it comes."""
    evaluate = request_check.lenient(guard_pb.EvaluateRequest.FromString)
    revoke = request_check.lenient(admin_pb.RevokeCredentialRequest.FromString)
    assert evaluate is not None and revoke is not None
    body = guard_pb.EvaluateRequest(service_id="svc-a").SerializeToString()
    for _ in range(2):
        assert evaluate(body) == guard_pb.EvaluateRequest(service_id="svc-a")
        # Field 1 is a credential id there: "svc-a" is not one.
        refused = revoke(body)
        assert isinstance(refused, request_check.Refused)
        assert [v.field for v in refused.error.violations] == ["credential_id"]
    bad = guard_pb.EvaluateRequest(service_id="svc-a", client_ip="1.2.3.4\0").SerializeToString()
    for _ in range(2):
        refused = evaluate(bad)
        assert isinstance(refused, request_check.Refused)
        assert [v.field for v in refused.error.violations] == ["client_ip"]


async def test_a_long_value_or_many_bad_entries_still_get_invalid_argument(
    pg_server: RunningServer,
) -> None:
    """A status travels in trailing metadata, which clients refuse beyond
    8-16 KiB: a 20,000-character value echoed back, or a thousand bad
    entries each named, made the caller's mistake a "Stream removed"."""
    guard = FingerprintGuardStub(pg_server.channel(await pg_server.credential("internal")))
    detail = await expect_error(
        guard.Evaluate(
            guard_pb.EvaluateRequest(
                service_id="shop",
                action=guard_pb.ACTION_REGISTER,
                account=types_pb.Account(kind=types_pb.ACCOUNT_KIND_LOGIN_ID, value="long-1"),
                components=fingerprint("long"),
                client_ip="1" * 20_000,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"client_ip"}
    assert len(detail.violations["client_ip"]) <= 300
    _, partner_token = await pg_server.partner()
    bad = [types_pb.Account(kind=types_pb.ACCOUNT_KIND_PHONE_NUMBER, value="x" * 100)] * 1000
    detail = await expect_error(
        bs.add_accounts(pg_server, partner_token, bad),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    listed = [field for field in detail.violations if field]
    assert 0 < len(listed) < 1000
    assert detail.violations[""] == f"and {1000 - len(listed)} more, not listed"
