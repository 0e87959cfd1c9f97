"""Three replicas on one PostgreSQL and one Redis, driven like the README's
walk-through through a client that round-robins over them: the report on
one, the partner's stream on another, the device's watch on a third, usage
questions relayed to the replica holding the stream, and the guard's exact
limit with one browser's registrations spread over all three."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import redis.asyncio as redis

from tests import binding_support as bs
from tests import provisioning_support as ps
from tests.conftest import claimed_redis_database
from tests.guard_support import fingerprint
from tests.support import RunningServer
from tests.test_guard_linking import desktop, fresh_network
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1 import service_pb2_grpc as admin_grpc
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.binding.v1 import service_pb2_grpc as binding_grpc
from tether.clients.connection import open_channel
from tether.clients.device.provisioning import DeviceProvisioning
from tether.clients.guard.client import GuardClient, account
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.provisioning.v1 import messages_pb2 as pb
from tether.server.guard.restorer import MARKER

ACTIVATING = pb.ENTITLEMENT_STATE_ACTIVATING
ACTIVE = pb.ENTITLEMENT_STATE_ACTIVE
# Small pools: three servers share the test PostgreSQL's 100 connections.
REPLICA_ENV = {
    "TETHER_DATABASE_POOL_SIZE": "2",
    "TETHER_PROVISIONING_POLL_SECONDS": "5",
    "TETHER_REDIS_TIMEOUT_SECONDS": "2",
}


@contextlib.asynccontextmanager
async def replicas(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[list[ps.ServerProcess]]:
    servers = [
        ps.ServerProcess(
            database_url=postgres_url,
            redis_url=redis_url,
            digest_keys=pg_server.app.settings.digest_keys,
            data_dir=tmp_path / name,
            env=REPLICA_ENV,
        )
        for name in ("a", "b", "c")
    ]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


def round_robin(servers: list[ps.ServerProcess], token: str) -> grpc.aio.Channel:
    """One channel over every replica; each call goes to the next one."""
    target = "ipv4:" + ",".join(server.address for server in servers)
    return open_channel(target, token, options=[("grpc.lb_policy_name", "round_robin")])


async def _collect(
    events: AsyncIterator[pb.EntitlementEvent], into: list[pb.EntitlementEvent], count: int
) -> None:
    async for event in events:
        into.append(event)
        if len(into) >= count:
            return


async def test_the_walk_through_across_three_replicas_behind_round_robin(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with replicas(pg_server, postgres_url, redis_url, tmp_path) as servers:
        a, b, c = servers
        async with round_robin(servers, pg_server.admin_token) as admin_channel:
            admin = admin_grpc.AdminStub(admin_channel)
            partner_id = f"p-{secrets.token_hex(5)}"
            await admin.CreatePartner(
                admin_pb.CreatePartnerRequest(
                    request_id=secrets.token_hex(8),
                    partner_id=partner_id,
                    display_name="ACME Mobile",
                    rebind_policy=admin_pb.REBIND_POLICY_REFUSE,
                )
            )
            await admin.CreateService(
                admin_pb.CreateServiceRequest(
                    request_id=secrets.token_hex(8),
                    partner_id=partner_id,
                    service_id="free-data",
                    display_name="Free mobile data",
                )
            )
            tokens = {}
            for kind, owner in (("partner", partner_id), ("device", ""), ("internal", "")):
                made = await admin.CreateCredential(
                    admin_pb.CreateCredentialRequest(
                        kind=getattr(admin_pb, f"CREDENTIAL_KIND_{kind.upper()}"),
                        partner_id=owner,
                        label=f"replicas {kind}",
                    )
                )
                tokens[kind] = made.token

        phone = bs.phone_account()
        device = bs.device()
        partner = ps.RecordingPartner(figures={"data_mb": 30, "sessions": 2})
        async with (
            round_robin(servers, tokens["partner"]) as partner_rr,
            round_robin(servers, tokens["device"]) as device_rr,
            round_robin(servers, tokens["internal"]) as internal_rr,
            open_channel(a.address, tokens["device"]) as device_on_a,
            open_channel(b.address, tokens["partner"]) as partner_on_b,
            open_channel(c.address, tokens["device"]) as device_on_c,
        ):
            # The partner imports its list (through any replica).
            added = await binding_grpc.BindingStub(partner_rr).AddEligibleAccounts(
                binding_pb.AddEligibleAccountsRequest(
                    entries=[
                        binding_pb.EligibleAccountEntry(
                            account=phone, partner_reference="customer-1001"
                        )
                    ]
                )
            )
            assert added.added_count == 1

            # Its backend's stream is on b only; the phone watches on c.
            async with ps.running_worker(partner_on_b, partner):
                internal = ps.stub_at(internal_rr)

                async def round_robin_reaches_all_three() -> bool:
                    streams = [
                        (
                            await internal.GetPipeline(pb.GetPipelineRequest(partner_id=partner_id))
                        ).connected_streams[partner_id]
                        for _ in servers
                    ]
                    return sorted(streams) == [0, 0, 1]

                await ps.eventually(
                    round_robin_reaches_all_three, what="three replicas, one stream on b"
                )

                seen: list[pb.EntitlementEvent] = []
                watching = asyncio.create_task(
                    _collect(DeviceProvisioning(device_on_c).watch(device), seen, 2)
                )
                # The phone reports its new SIM's number on a.
                reported = await binding_grpc.BindingStub(device_on_a).ReportAccountUse(
                    bs.report_request(device, phone)
                )
                (outcome,) = reported.outcomes
                assert outcome.outcome == binding_pb.REPORT_OUTCOME_BOUND
                binding = outcome.binding
                assert binding.partner_reference == "customer-1001"

                # b delivers, the partner confirms on b, c's watch sees it.
                await asyncio.wait_for(watching, 20)
                assert [e.state for e in seen] == [ACTIVATING, ACTIVE]
                assert sum(partner.opened.values()) == 1

                devices = DeviceProvisioning(device_rr)
                for _ in servers:
                    yes = await devices.check(device, phone, partner_id, "free-data")
                    assert yes.entitled and yes.state == ACTIVE
                    no = await devices.check(bs.device(), phone, partner_id, "free-data")
                    assert not no.entitled

                # Usage asked on every replica: a and c relay to b's stream.
                for _ in range(6):
                    usage = await devices.usage(device, binding.binding_id, "free-data", timeout=10)
                    assert usage.source == pb.USAGE_ANSWER_SOURCE_PARTNER
                    assert {f.metric: f.quantity for f in usage.figures} == {
                        "data_mb": 30,
                        "sessions": 2,
                    }
                assert len(partner.usage_queries) == 6
                assert {q.binding_id for q in partner.usage_queries} == {binding.binding_id}

                recorded = await devices.report_usage(
                    device, binding.binding_id, "free-data", [(datetime.now(UTC), "data_mb", 30)]
                )
                assert recorded == 1

            # Another phone with the same number is refused, on any replica.
            device_stub = binding_grpc.BindingStub(device_rr)
            for _ in servers:
                refused = await device_stub.ReportAccountUse(bs.report_request(bs.device(), phone))
                assert [o.outcome for o in refused.outcomes] == [
                    binding_pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE
                ]

            # With the stream gone from b, every replica says so at once.
            for _ in servers:
                known = await devices.usage(device, binding.binding_id, "free-data", timeout=10)
                assert known.source == pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED
                assert {f.metric: f.quantity for f in known.figures} == {
                    "data_mb": 30,
                    "sessions": 2,
                }
            assert len(partner.usage_queries) == 6


async def test_one_browser_registering_through_three_replicas_gets_exactly_the_limit(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    internal_token = await pg_server.credential("internal")
    async with (
        replicas(pg_server, postgres_url, redis_url, tmp_path) as servers,
        round_robin(servers, internal_token) as channel,
    ):
        guard = GuardClient(channel)
        limit = 5
        service_id = f"svc-{secrets.token_hex(5)}"
        await guard.set_policy(guard_pb.Policy(service_id=service_id, register_limit=limit))
        # The round robin connects to all three as calls begin.
        for _ in range(10):
            await guard.get_policy(service_id)
        browser = fingerprint(f"replicas-{secrets.token_hex(4)}")
        verdicts = await asyncio.gather(
            *(
                guard.evaluate(
                    service_id, "register", account(f"racer{i}"), browser, "198.51.100.9"
                )
                for i in range(300)
            )
        )
        allowed = [v for v in verdicts if v.verdict == guard_pb.VERDICT_ALLOW]
        assert len(allowed) == limit
        assert sorted(v.count for v in allowed) == list(range(1, limit + 1))
        assert not any(v.fail_open for v in verdicts)
        (identity,) = {v.identity for v in verdicts}
        # Every replica took part: each has the browser in its own identity book.
        for server in servers:
            async with open_channel(server.address, internal_token) as direct:
                explained = await GuardClient(direct).explain_identity(identity)
                assert explained.identity == identity


async def test_a_browser_drifting_across_replicas_stays_one_identity(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    internal_token = await pg_server.credential("internal")
    async with (
        replicas(pg_server, postgres_url, redis_url, tmp_path) as servers,
        contextlib.AsyncExitStack() as stack,
    ):
        guards = [
            GuardClient(
                await stack.enter_async_context(open_channel(server.address, internal_token))
            )
            for server in servers
        ]
        service_id = f"svc-{secrets.token_hex(5)}"
        await guards[0].set_policy(guard_pb.Policy(service_id=service_id, register_limit=3))
        home = fresh_network()
        seed = secrets.token_hex(4)
        fonts = [f"Font {seed} {i}" for i in range(30)]
        # An update, a resized window, another language, a font installed:
        # each variant's registration lands on another replica.
        variants = [
            desktop(seed),
            desktop(seed, browser_version="131.0.6778.140"),
            desktop(seed, screen_width=1600, screen_height=900),
            desktop(seed, languages=["fr-FR", "fr"]),
            desktop(seed, fonts=[*fonts, "Noto Sans Mono"]),
        ]
        first = await guards[0].evaluate(service_id, "register", account("d0"), variants[0], home)
        verdicts = [first]
        for i, variant in enumerate(variants[1:], start=1):
            guard = guards[i % len(guards)]

            async def knows_the_browser(guard: GuardClient = guard, count: int = i) -> bool:
                # What the other replicas recorded has reached this one's book.
                try:
                    view = await guard.explain_identity(first.identity)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                    return False
                return len(view.fingerprints) == count

            await ps.eventually(knows_the_browser, what=f"replica {i % 3} follows the book")
            verdict = await guard.evaluate(service_id, "register", account(f"d{i}"), variant, home)
            assert verdict.identity == first.identity, verdict.explanation
            verdicts.append(verdict)
        assert [v.verdict for v in verdicts] == [guard_pb.VERDICT_ALLOW] * 3 + [
            guard_pb.VERDICT_DENY
        ] * 2


async def _all(
    responses: AsyncIterable[guard_pb.BacktestResponse],
) -> list[guard_pb.BacktestResponse]:
    return [response async for response in responses]


def _restores(servers: list[ps.ServerProcess]) -> int:
    """Restores of the guard's counters the replicas logged, all together."""
    count = 0
    for server in servers:
        for line in (server.data_dir / f"server-{server.port}.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                count += json.loads(line).get("event", "").startswith("guard counters restored")
    return count


async def test_one_replica_restores_the_guard_counters_for_all_when_redis_loses_them(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    internal_token = await pg_server.credential("internal")
    async with (
        claimed_redis_database(besides=redis_url) as own_redis,
        replicas(pg_server, postgres_url, own_redis, tmp_path) as servers,
        round_robin(servers, internal_token) as channel,
    ):
        # A fresh Redis: one replica restored it at start, the others waited.
        assert _restores(servers) == 1
        guard = GuardClient(channel)
        service_id = f"svc-{secrets.token_hex(5)}"
        await guard.set_policy(guard_pb.Policy(service_id=service_id, register_limit=2))
        browser = fingerprint(f"restore-{secrets.token_hex(4)}")
        ip = "198.51.100.10"
        for i in range(2):
            allowed = await guard.evaluate(service_id, "register", account(f"r{i}"), browser, ip)
            assert allowed.verdict == guard_pb.VERDICT_ALLOW

        client = redis.Redis.from_url(own_redis)
        try:
            await client.flushdb()

            async def restored() -> bool:
                return bool(await client.exists(MARKER))

            await ps.eventually(restored, what="the counters restored")
        finally:
            await client.aclose()

        # The restorer logs after it lets go of its claim, a moment after
        # the marker: the count is read once the line is there.
        async def logged() -> bool:
            return _restores(servers) >= 2

        await ps.eventually(logged, what="the restore logged")
        assert _restores(servers) == 2
        # Restored, the browser is still at its limit on every replica.
        for i in range(3):
            again = await guard.evaluate(service_id, "register", account(f"late{i}"), browser, ip)
            assert again.verdict == guard_pb.VERDICT_DENY, again


async def test_a_replica_starting_deletes_dead_backtests_keys_but_not_a_running_ones(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    guard = GuardClient(pg_server.channel(await pg_server.credential("internal")))
    policy = guard_pb.Policy(service_id=f"svc-{secrets.token_hex(5)}", register_limit=2)
    browser = fingerprint(f"backtest-{secrets.token_hex(4)}")
    t0 = 1_780_000_000.0

    def event(i: int) -> guard_pb.BacktestEvent:
        message = guard_pb.BacktestEvent(
            request=guard_pb.EvaluateRequest(
                action=guard_pb.ACTION_REGISTER,
                account=account(f"bt{i}"),
                components=browser,
                client_ip="198.51.100.11",
            )
        )
        message.event_time.FromNanoseconds(int((t0 + i) * 1e9))
        return message

    halfway = asyncio.Event()

    async def requests() -> AsyncIterator[guard_pb.BacktestRequest]:
        yield guard_pb.BacktestRequest(start=guard_pb.BacktestStart(policy=policy, verdicts=True))
        yield guard_pb.BacktestRequest(events=guard_pb.BacktestEvents(events=[event(0), event(1)]))
        await halfway.wait()
        yield guard_pb.BacktestRequest(events=guard_pb.BacktestEvents(events=[event(2), event(3)]))

    client = redis.Redis.from_url(redis_url)
    try:
        # A run that died with its server: its keys are a leftover.
        await client.set("tether:bt:0123456789abcdef:g:x", b"1")
        verdicts: list[guard_pb.BacktestVerdict] = []
        summary: guard_pb.BacktestSummary | None = None
        run = guard.stub.Backtest(requests())
        # The first events are counted (their verdicts come with the rest).
        responses = asyncio.create_task(_all(run))
        dead = b"tether:bt:0123456789abcdef:g:x"

        async def counting() -> bool:
            return len(await client.keys("tether:bt:*")) >= 2

        await ps.eventually(counting, what="the backtest counting")
        before = set(await client.keys("tether:bt:*"))
        assert dead in before
        async with replicas(pg_server, postgres_url, redis_url, tmp_path):
            # Each replica swept the leftovers at its start; the run kept its keys.
            assert set(await client.keys("tether:bt:*")) == before - {dead}
        halfway.set()
        for response in await asyncio.wait_for(responses, 30):
            if response.HasField("verdict"):
                verdicts.append(response.verdict)
            else:
                summary = response.summary
    finally:
        await client.aclose()
    assert [v.response.verdict for v in verdicts] == [guard_pb.VERDICT_ALLOW] * 2 + [
        guard_pb.VERDICT_DENY
    ] * 2
    assert summary is not None
