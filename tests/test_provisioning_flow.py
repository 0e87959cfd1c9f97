"""From a report to an open service, end to end, and what devices see: the
watch feed, entitlement checks, usage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from tests import binding_support as bs
from tests import provisioning_support as ps
from tests.support import RunningServer, expect_error, start_server
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.clients.device.provisioning import DeviceProvisioning
from tether.clients.internal.provisioning import InternalProvisioning
from tether.clients.partner.provisioning import Done, Failed, PartnerProvisioning
from tether.provisioning.v1 import messages_pb2 as pb
from tether.server.provisioning.wakeup import feed_topic, instructions_topic

ACTIVATING = pb.ENTITLEMENT_STATE_ACTIVATING
ACTIVE = pb.ENTITLEMENT_STATE_ACTIVE
REVOKED = pb.ENTITLEMENT_STATE_REVOKED


async def _collect(
    events: AsyncIterator[pb.EntitlementEvent], into: list[pb.EntitlementEvent], count: int
) -> None:
    async for event in events:
        into.append(event)
        if len(into) >= count:
            return


async def test_document_a_flow_from_list_to_usage_answer(any_server: RunningServer) -> None:
    partner_id, partner_token = await any_server.partner(services=("free-data",))
    device_token = await any_server.credential("device")
    devices = DeviceProvisioning(any_server.channel(device_token))
    partner = ps.RecordingPartner(figures={"data_mb": 512, "sessions": 3})
    account = bs.phone_account()
    device = bs.device()

    async with ps.running_worker(any_server.channel(partner_token), partner):
        # The device watches before anything exists for it.
        seen: list[pb.EntitlementEvent] = []
        watching = asyncio.create_task(_collect(devices.watch(device), seen, 2))

        # An account not on the list is not bound, and nothing goes out.
        stranger = await bs.stub(any_server, device_token).ReportAccountUse(
            bs.report_request(bs.device(), bs.phone_account())
        )
        assert list(stranger.outcomes) == []

        bound = await ps.bind(
            any_server, device_token, partner_token, account=account, device=device
        )
        await asyncio.wait_for(watching, 20)

        # The partner got one open instruction carrying its own reference.
        (instruction_id,) = partner.opened
        assert [e.state for e in seen] == [ACTIVATING, ACTIVE]
        assert [e.position for e in seen] == [1, 2]
        assert seen[1].binding_id == bound.binding.binding_id
        assert seen[1].service_id == "free-data"

        yes = await devices.check(device, account, partner_id, "free-data")
        assert yes.entitled and yes.state == ACTIVE
        assert yes.binding_id == bound.binding.binding_id
        other = await devices.check(bs.device(), account, partner_id, "free-data")
        assert not other.entitled and other.state == pb.ENTITLEMENT_STATE_UNSPECIFIED
        wrong_account = await devices.check(device, bs.phone_account(), partner_id, "free-data")
        assert not wrong_account.entitled

        usage = await devices.usage(device, bound.binding.binding_id, "free-data", timeout=10)
        assert usage.source == pb.USAGE_ANSWER_SOURCE_PARTNER
        assert {f.metric: f.quantity for f in usage.figures} == {"data_mb": 512, "sessions": 3}
        (query,) = partner.usage_queries
        assert query.partner_reference == bound.binding.partner_reference

    records = await ps.instructions_of(any_server.app.runtime.db, partner_id)
    assert [(str(r.instruction_id), r.state) for r in records] == [(instruction_id, "confirmed")]


async def test_unbinding_revokes_on_the_device_and_closes_at_the_partner(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner(services=("music", "video"))
    device_token = await pg_server.credential("device")
    devices = DeviceProvisioning(pg_server.channel(device_token))
    partner = ps.RecordingPartner()
    async with ps.running_worker(pg_server.channel(partner_token), partner):
        bound = await ps.bind(pg_server, device_token, partner_token)
        seen: list[pb.EntitlementEvent] = []
        await asyncio.wait_for(_collect(devices.watch(bound.device), seen, 4), 20)
        await bs.stub(pg_server, device_token).Unbind(
            binding_pb.UnbindRequest(
                request_id="u1", binding_id=bound.binding.binding_id, device=bound.device
            )
        )
        after: list[pb.EntitlementEvent] = []
        await asyncio.wait_for(
            _collect(devices.watch(bound.device, seen[-1].position), after, 2), 20
        )
        assert {(e.service_id, e.state, e.reason) for e in after} == {
            ("music", REVOKED, "unbound"),
            ("video", REVOKED, "unbound"),
        }
        await ps.eventually(lambda: _closed_count(partner, 2), what="two closes")
        check = await devices.check(bound.device, bound.account, partner_id, "music")
        assert not check.entitled and check.state == REVOKED


async def test_late_open_confirmation_after_unbinding_leaves_the_entitlement_revoked(
    any_server: RunningServer,
) -> None:
    partner_id, partner_token = await any_server.partner(services=("music",))
    device_token = await any_server.credential("device")
    devices = DeviceProvisioning(any_server.channel(device_token))
    partner = PartnerProvisioning(any_server.channel(partner_token))
    bound = await ps.bind(any_server, device_token, partner_token)
    (opening,) = await partner.fetch()
    assert opening.kind == pb.INSTRUCTION_KIND_OPEN
    await bs.stub(any_server, device_token).Unbind(
        binding_pb.UnbindRequest(
            request_id="u1", binding_id=bound.binding.binding_id, device=bound.device
        )
    )
    revoked = await devices.check(bound.device, bound.account, partner_id, "music")
    assert not revoked.entitled and revoked.state == REVOKED

    # The partner, slow, confirms the open after the unbinding: its result
    # is recorded, but the entitlement does not come back.
    late = await partner.confirm(opening.instruction_id, Done("sub-late"))
    assert late.outcome == pb.CONFIRMATION_OUTCOME_ACCEPTED
    check = await devices.check(bound.device, bound.account, partner_id, "music")
    assert not check.entitled and check.state == REVOKED
    seen: list[pb.EntitlementEvent] = []
    await asyncio.wait_for(_collect(devices.watch(bound.device), seen, 2), 20)
    assert [e.state for e in seen] == [ACTIVATING, REVOKED]
    db = any_server.app.runtime.db
    assert await ps.activations_per_binding(db, partner_id) == {}


async def test_a_partner_refusing_the_open_for_good_fails_the_entitlement(
    any_server: RunningServer,
) -> None:
    partner_id, partner_token = await any_server.partner(services=("music",))
    device_token = await any_server.credential("device")
    devices = DeviceProvisioning(any_server.channel(device_token))
    partner = PartnerProvisioning(any_server.channel(partner_token))
    bound = await ps.bind(any_server, device_token, partner_token)
    (opening,) = await partner.fetch()
    await partner.confirm(opening.instruction_id, Failed("no such customer", retryable=False))
    check = await devices.check(bound.device, bound.account, partner_id, "music")
    assert not check.entitled and check.state == pb.ENTITLEMENT_STATE_FAILED


async def _closed_count(partner: ps.RecordingPartner, n: int) -> bool:
    return len(partner.closed) == n


async def test_device_resuming_from_its_last_position_misses_nothing(
    pg_server: RunningServer,
) -> None:
    _partner_id, partner_token = await pg_server.partner(services=("a-service",))
    device_token = await pg_server.credential("device")
    devices = DeviceProvisioning(pg_server.channel(device_token))
    device = bs.device()
    partner = ps.RecordingPartner()
    async with ps.running_worker(pg_server.channel(partner_token), partner):
        first = await ps.bind(pg_server, device_token, partner_token, device=device)
        seen: list[pb.EntitlementEvent] = []
        await asyncio.wait_for(_collect(devices.watch(device), seen, 2), 20)
        # Disconnected: a second account is bound and the first unbound.
        await ps.bind(pg_server, device_token, partner_token, device=device)
        await bs.stub(pg_server, device_token).Unbind(
            binding_pb.UnbindRequest(
                request_id="r1", binding_id=first.binding.binding_id, device=device
            )
        )
        resumed: list[pb.EntitlementEvent] = []
        await asyncio.wait_for(_collect(devices.watch(device, seen[-1].position), resumed, 3), 20)
    everything: list[pb.EntitlementEvent] = []
    await asyncio.wait_for(_collect(devices.watch(device), everything, 5), 20)
    assert [e.position for e in everything] == [1, 2, 3, 4, 5]
    assert seen + resumed == everything


async def test_usage_without_a_connected_partner_gives_last_known_figures(
    any_server: RunningServer,
) -> None:
    _partner_id, partner_token = await any_server.partner(services=("free-data",))
    device_token = await any_server.credential("device")
    devices = DeviceProvisioning(any_server.channel(device_token))
    bound = await ps.bind(any_server, device_token, partner_token)
    binding_id = bound.binding.binding_id

    nothing = await devices.usage(bound.device, binding_id, "free-data")
    assert nothing.source == pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED
    assert list(nothing.figures) == []
    assert not nothing.HasField("as_of_time")

    now = datetime.now(UTC)
    recorded = await devices.report_usage(
        bound.device,
        binding_id,
        "free-data",
        [(now - timedelta(hours=1), "data_mb", 30), (now, "data_mb", 12)],
    )
    assert recorded == 2
    known = await devices.usage(bound.device, binding_id, "free-data")
    assert known.source == pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED
    assert {f.metric: f.quantity for f in known.figures} == {"data_mb": 42}


async def test_usage_from_a_silent_partner_returns_within_the_deadline(
    pg_server: RunningServer,
) -> None:
    _partner_id, partner_token = await pg_server.partner(services=("free-data",))
    device_token = await pg_server.credential("device")
    devices = DeviceProvisioning(pg_server.channel(device_token))
    bound = await ps.bind(pg_server, device_token, partner_token)
    partner = ps.RecordingPartner(hangs_on_usage=True)
    async with ps.running_worker(pg_server.channel(partner_token), partner):
        response = await devices.usage(
            bound.device, bound.binding.binding_id, "free-data", timeout=1.0
        )
    assert partner.usage_asked.is_set()
    assert response.source == pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NO_ANSWER


async def test_usage_of_another_devices_binding_is_refused(pg_server: RunningServer) -> None:
    _, partner_token = await pg_server.partner()
    device_token = await pg_server.credential("device")
    devices = DeviceProvisioning(pg_server.channel(device_token))
    bound = await ps.bind(pg_server, device_token, partner_token)
    now = datetime.now(UTC)
    await expect_error(
        devices.report_usage(bs.device(), bound.binding.binding_id, "free-data", [(now, "x", 1)]),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_BINDING_OF_OTHER_DEVICE",
    )
    await expect_error(
        devices.report_usage(bound.device, bound.binding.binding_id, "nope", [(now, "x", 1)]),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_ENTITLEMENT_NOT_FOUND",
    )
    detail = await expect_error(
        devices.report_usage(bound.device, "", "free-data", [(now, "BAD METRIC", -1)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {
        "report.binding_id",
        "report.events[0].figure.metric",
        "report.events[0].figure.quantity",
    }
    # A malformed id is refused before anything else is looked at.
    detail = await expect_error(
        devices.report_usage(bound.device, "not-a-uuid", "free-data", [(now, "BAD METRIC", -1)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"report.binding_id"}


async def test_internal_usage_query_sums_per_day_in_pages(pg_server: RunningServer) -> None:
    partner_id, partner_token = await pg_server.partner(services=("free-data", "music"))
    device_token = await pg_server.credential("device")
    devices = DeviceProvisioning(pg_server.channel(device_token))
    bound = await ps.bind(pg_server, device_token, partner_token)
    binding_id = bound.binding.binding_id
    day = datetime(2026, 3, 1, 12, tzinfo=UTC)
    await devices.report_usage(
        bound.device,
        binding_id,
        "free-data",
        [(day, "data_mb", 10), (day, "data_mb", 5), (day + timedelta(days=1), "data_mb", 7)],
    )
    await devices.report_usage(bound.device, binding_id, "music", [(day, "minutes", 40)])
    internal = InternalProvisioning(pg_server.channel(await pg_server.credential("internal")))

    pages = [
        page
        async for page in internal.usage(
            day - timedelta(days=1), day + timedelta(days=5), partner_id=partner_id, page_size=2
        )
    ]
    rows = [
        (d.day, d.service_id, d.metric, d.event_count, d.quantity) for p in pages for d in p.days
    ]
    assert rows == [
        ("2026-03-01", "free-data", "data_mb", 2, 15),
        ("2026-03-01", "music", "minutes", 1, 40),
        ("2026-03-02", "free-data", "data_mb", 1, 7),
    ]
    assert len(pages) == 2
    totals = {t.metric: (t.event_count, t.quantity) for t in pages[0].totals}
    assert totals == {"data_mb": (3, 22), "minutes": (1, 40)}

    by_device = [
        page
        async for page in internal.usage(
            day, day + timedelta(days=1), device=bound.device, service_id="music"
        )
    ]
    assert [(d.metric, d.quantity) for d in by_device[0].days] == [("minutes", 40)]

    # A partner sees its own usage only.
    partner_view = InternalProvisioning(pg_server.channel(partner_token))
    await expect_error(
        anext(aiter(partner_view.usage(day, day + timedelta(days=1), partner_id="someone-else"))),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_PARTNER_NOT_FOUND",
    )
    with contextlib.suppress(StopAsyncIteration):
        await expect_error(
            anext(aiter(internal.usage(day + timedelta(days=1), day))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
        )


async def test_stopping_server_ends_device_watches_so_they_resume_elsewhere(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    server = await start_server(database_url=postgres_url, redis_url=redis_url, data_dir=tmp_path)
    try:
        device_token = await server.credential("device")
        devices = DeviceProvisioning(server.channel(device_token))
        seen: list[pb.EntitlementEvent] = []
        watching = asyncio.create_task(_collect(devices.watch(bs.device()), seen, 1))
        # The stream is open once the server has subscribed its wake-up topic.
        wakeup = server.app.areas.provisioning.wakeup

        async def subscribed() -> bool:
            return wakeup.subscribed_topics > 0

        await ps.eventually(subscribed, what="watch subscribed")
    finally:
        # A long grace: only the server ending the watch lets this finish soon.
        await asyncio.wait_for(server.app.stop(grace=60), 20)
    await asyncio.wait_for(watching, 5)
    assert seen == []


async def test_a_new_binding_wakes_its_partner_and_device_when_the_report_returns(
    any_server: RunningServer,
) -> None:
    partner_id, partner_token = await any_server.partner(services=("wake-me",))
    device_token = await any_server.credential("device")
    wakeup = any_server.app.areas.provisioning.wakeup
    first, second, device = bs.phone_account(), bs.phone_account(), bs.device()
    await bs.add_accounts(any_server, partner_token, [first, second])
    reports = bs.stub(any_server, device_token)
    with wakeup.subscribe(instructions_topic(partner_id)) as partner_woken:
        response = await reports.ReportAccountUse(bs.report_request(device, first))
        (outcome,) = response.outcomes
        assert outcome.outcome == binding_pb.REPORT_OUTCOME_BOUND
        # Woken in this process on commit, before the answer went out.
        assert partner_woken.is_set()
    device_topic = feed_topic(bytes.fromhex(outcome.binding.device_digest))
    with wakeup.subscribe(device_topic) as device_woken:
        another = await reports.ReportAccountUse(bs.report_request(device, second))
        assert another.outcomes[0].outcome == binding_pb.REPORT_OUTCOME_BOUND
        assert device_woken.is_set()
