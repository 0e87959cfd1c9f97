"""Bad input is never INTERNAL or UNKNOWN: hypothesis drives every RPC with
generated and mutated messages and raw bodies, on a server of its own.

A refused call writes no row and no Redis key, and the server is healthy
after. `make test` runs a short fuzz; `make fuzz` a long one
(TETHER_FUZZ_REQUESTS, default 100,000) and prints its figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import binding_support as bs
from tests import fuzz_support as fuzz
from tests import provisioning_support as ps
from tests.conftest import claimed_redis_database, create_database, drop_database
from tests.guard_support import fingerprint
from tests.support import RunningServer, start_server
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.provisioning.v1 import messages_pb2 as prov_pb

REQUESTS = int(os.environ.get("TETHER_FUZZ_REQUESTS", "600"))
# Storage is compared around one refused call in this many (1: each one).
CHECK_WRITES_EVERY = int(os.environ.get("TETHER_FUZZ_CHECK_WRITES_EVERY", "1"))
# Calls sent at once (1: one by one, each refusal's writes compared alone).
BATCH = int(os.environ.get("TETHER_FUZZ_BATCH", "1"))
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass
class World:
    server: RunningServer
    storage: fuzz.Storage
    channel: grpc.aio.Channel
    tokens: list[str]
    pools: fuzz.Pools
    partner_id: str
    statuses: Counter[str] = field(default_factory=Counter)
    per_rpc: Counter[tuple[str, str]] = field(default_factory=Counter)
    requests: int = 0
    seconds_per_rpc: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    checked: int = 0
    last_ok: bool = True


@pytest.fixture(scope="module")
async def world(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    name, url = await create_database()
    async with claimed_redis_database(besides=redis_url) as own_redis:
        server = await start_server(
            database_url=url, redis_url=own_redis, data_dir=tmp_path_factory.mktemp("fuzz")
        )
        partner_id, partner_token = await server.partner(services=("free-data", "music"))
        device_token = await server.credential("device")
        internal_token = await server.credential("internal")
        bound = await ps.bind(server, device_token, partner_token)
        # Ids the fuzzer may revoke: not those of the tokens it calls with.
        await server.credential("device")
        credentials = await server.admin().ListCredentials(admin_pb.ListCredentialsRequest())
        in_use = {
            t.split(".")[0]
            for t in (server.admin_token, partner_token, device_token, internal_token)
        }
        pools = fuzz.Pools()
        pools.add(
            partner_id,
            "free-data",
            "music",
            bound.binding.binding_id,
            bound.account.value,
            bound.device.terminal_id,
            bs.phone(),
            bs.imei(),
            *[c.credential_id for c in credentials.credentials if c.credential_id not in in_use],
        )
        _add_templates(pools, partner_id, bound)
        storage = fuzz.Storage(server.app.runtime.db, own_redis)
        channel = grpc.aio.insecure_channel(server.address)
        tokens = [
            server.admin_token,
            partner_token,
            device_token,
            internal_token,
            "",
            "cred_0000000000000000.nonsense",
        ]
        try:
            yield World(server, storage, channel, tokens, pools, partner_id)
        finally:
            await channel.close()
            await storage.close()
            await server.stop()
    await drop_database(name)


def _add_templates(pools: fuzz.Pools, partner_id: str, bound: ps.Bound) -> None:
    """Well-formed requests of the write paths, for the fuzzer to change."""
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    hour_ago = Timestamp(seconds=now.seconds - 3600)
    report = prov_pb.UsageReport(
        binding_id=bound.binding.binding_id,
        service_id="free-data",
        events=[
            prov_pb.UsageEvent(occur_time=now, figure=prov_pb.UsageFigure(metric="mb", quantity=3))
        ],
    )
    admin, binding, provisioning, guard = (
        f"/tether.{area}.v1.{service}/"
        for area, service in (
            ("admin", "Admin"),
            ("binding", "Binding"),
            ("provisioning", "Provisioning"),
            ("guard", "FingerprintGuard"),
        )
    )
    pools.template(
        admin + "CreatePartner",
        admin_pb.CreatePartnerRequest(request_id="t1", partner_id="fuzz-p", display_name="F"),
    )
    pools.template(
        admin + "CreateService",
        admin_pb.CreateServiceRequest(
            request_id="t2", partner_id=partner_id, service_id="fuzz-s", display_name="S"
        ),
    )
    pools.template(
        binding + "ReportAccountUse",
        bs.report_request(bound.device, bound.account),
        bs.report_request(bs.device(), bs.phone_account()),
    )
    pools.template(
        binding + "AddEligibleAccounts",
        binding_pb.AddEligibleAccountsRequest(
            entries=[binding_pb.EligibleAccountEntry(account=bs.phone_account())]
        ),
    )
    pools.template(
        provisioning + "ReportUsage",
        prov_pb.ReportUsageRequest(request_id="t3", report=report),
        prov_pb.ReportUsageRequest(request_id="t4", device=bound.device, report=report),
    )
    pools.template(
        provisioning + "QueryUsage",
        prov_pb.QueryUsageRequest(service_id="free-data", start_time=hour_ago, end_time=now),
    )
    pools.template(
        provisioning + "CheckEntitlement",
        prov_pb.CheckEntitlementRequest(
            device=bound.device,
            account=bound.account,
            partner_id=partner_id,
            service_id="free-data",
        ),
    )
    pools.template(
        guard + "SetPolicy",
        guard_pb.SetPolicyRequest(policy=guard_pb.Policy(service_id="guarded", register_limit=2)),
    )
    pools.template(
        guard + "Evaluate",
        guard_pb.EvaluateRequest(
            service_id="guarded",
            action=guard_pb.ACTION_REGISTER,
            account=bs.phone_account(),
            components=fingerprint("fuzz"),
            client_ip="10.1.2.3",
        ),
    )


RPCS = fuzz.rpcs()


def test_the_fuzzer_covers_every_rpc() -> None:
    assert len(RPCS) >= 43
    assert {r.name for r in RPCS} >= {"Connect", "ImportEligibleAccounts", "Backtest", "Evaluate"}


@st.composite
def fuzzed_calls(
    draw: st.DrawFn, pools: fuzz.Pools
) -> tuple[fuzz.Rpc, int, list[tuple[str, bytes]]]:
    rpc = draw(st.sampled_from(RPCS))
    token = draw(st.integers(0, 5))
    return rpc, token, draw(fuzz.bodies(rpc, pools))


Call = tuple[fuzz.Rpc, int, list[tuple[str, bytes]]]


async def _fuzz_batch(world: World, calls: list[Call]) -> None:
    """Sends the calls at once; storage is compared around the batch when
    every call in it was refused (bidi streams may write and then fail)."""
    check_writes = world.requests % CHECK_WRITES_EVERY < len(calls) and not any(
        rpc.client_streaming and rpc.server_streaming for rpc, _, _ in calls
    )
    before = None
    if check_writes:
        before = await (world.storage.settled() if world.last_ok else world.storage.snapshot())
    answers = await asyncio.gather(*(_send(world, *c) for c in calls))
    world.last_ok = grpc.StatusCode.OK in answers
    if before is not None and not world.last_ok:
        world.checked += len(calls)
        written = (await world.storage.snapshot()).written_since(before)
        assert not written, f"refused with {answers} but wrote {written}: {calls!r}"


async def _send(
    world: World, rpc: fuzz.Rpc, token_index: int, bodies: list[tuple[str, bytes]]
) -> grpc.StatusCode:
    started = time.perf_counter()
    code, details = await fuzz.call(
        world.channel,
        rpc,
        [b for _, b in bodies],
        world.tokens[token_index],
        seconds=0.5 if rpc.server_streaming else 15.0,
    )
    world.requests += 1
    world.seconds_per_rpc[rpc.name] += time.perf_counter() - started
    status = "CLIENT_WRITE_RACE" if details == fuzz.CLIENT_WRITE_FAILED else code.name
    world.statuses[status] += 1
    world.per_rpc[(rpc.name, status)] += 1
    kinds = [kind for kind, _ in bodies]
    assert code not in NEVER, f"{rpc.path} answered {code.name} {details!r} to {kinds} {bodies!r}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.server_streaming:
        elapsed = time.perf_counter() - started
        pytest.fail(f"{rpc.path} hung {elapsed:.1f}s on {bodies!r}")
    return code


async def test_the_fuzzers_templates_reach_past_the_checks(world: World) -> None:
    by_path = {rpc.path: rpc for rpc in RPCS}
    for path, templates in world.pools.templates.items():
        for template in templates:
            answers = {
                (
                    await fuzz.call(
                        world.channel,
                        by_path[path],
                        [template.SerializeToString()],
                        token,
                        seconds=15,
                    )
                )
                for token in world.tokens[:4]
            }
            codes = {code for code, _ in answers}
            assert codes & {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}, (path, answers)


async def test_fuzzed_requests_are_never_internal_and_refusals_write_nothing(world: World) -> None:
    started = time.perf_counter()
    # Hypothesis runs examples synchronously: it drives them from a thread,
    # each call running on this loop, where the server is.
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=-(-REQUESTS // BATCH),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(st.data())
    def fuzz_one(data: st.DataObject) -> None:
        calls = [data.draw(fuzzed_calls(world.pools)) for _ in range(BATCH)]
        asyncio.run_coroutine_threadsafe(_fuzz_batch(world, calls), loop).result()

    await asyncio.to_thread(fuzz_one)
    elapsed = time.perf_counter() - started
    _report(world, elapsed)
    await _expect_healthy(world)


def _report(world: World, elapsed: float) -> None:
    lines = [
        f"fuzz: {world.requests} requests in {elapsed:.1f}s "
        f"({world.requests / elapsed:.0f}/s); storage compared around {world.checked} refusals",
        "fuzz statuses: " + ", ".join(f"{k}={v}" for k, v in world.statuses.most_common()),
        "fuzz slowest: "
        + ", ".join(
            f"{k} {v:.1f}s"
            for k, v in sorted(world.seconds_per_rpc.items(), key=lambda kv: -kv[1])[:5]
        ),
    ]
    figures = os.environ.get("TETHER_FUZZ_FIGURES")
    if figures:
        per_rpc = sorted(world.per_rpc.items())
        Path(figures).write_text(
            "\n".join(lines + [f"{rpc} {code} {n}" for (rpc, code), n in per_rpc]) + "\n"
        )
    print("\n" + "\n".join(lines))


async def _expect_healthy(world: World) -> None:
    health = health_pb2_grpc.HealthStub(world.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    partner = await world.server.admin().GetPartner(
        admin_pb.GetPartnerRequest(partner_id=world.partner_id), timeout=5
    )
    assert partner.partner.partner_id == world.partner_id
