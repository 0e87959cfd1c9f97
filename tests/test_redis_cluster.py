"""Tether on a Redis Cluster (3 masters, 3 replicas), through real gRPC:
every Redis path routed by slot, exact limits, redirections, and a master
killed under load. The shared local cluster (scripts/redis-cluster) serves
the tests that only use it; the ones that migrate slots or kill a master
run a private cluster of their own."""

from __future__ import annotations

import asyncio
import re
import time
import types as types_module
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from tests import binding_support as bs
from tests import cluster_support as cs
from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import RunningServer, start_server
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.clients.errors import details_of
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.binding import rate_limit
from tether.server.counters.cluster import tag_for_slot
from tether.server.counters.connection import KEY_PREFIX, connect
from tether.server.guard import keys, scripts

IP = "198.51.100.7"
# Only turns a hang into a failure: the server decides within its Redis bound.
NO_HANG = 10.0
RATE_LIMIT = 20


@pytest.fixture(scope="module")
async def cluster_server(
    postgres_url: str, redis_cluster_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_cluster_url,
        data_dir=tmp_path_factory.mktemp("cluster-server"),
        report_rate_per_minute=RATE_LIMIT,
    )
    yield server
    await server.stop()


async def test_evaluate_reaches_the_master_of_every_slot(
    cluster_server: RunningServer, redis_cluster_url: str
) -> None:
    guard = await guard_client(cluster_server)
    service = await new_service(guard, register_limit=1)
    verdicts = await asyncio.gather(
        *(
            guard.evaluate(
                service,
                "register",
                account(f"b{i}"),
                fingerprint(f"b{i}", screen_width=800 + i, languages=[f"x{i}-YY"]),
                IP,
            )
            for i in range(30)
        )
    )
    assert [v.verdict for v in verdicts] == [pb.VERDICT_ALLOW] * 30
    assert not any(v.fail_open for v in verdicts)
    # The browsers' keys live on every master, each counted where it lives.
    all_masters = await cs.masters(cs.seed_port(redis_cluster_url))
    served = {
        cs.master_of_slot(
            all_masters, cs.slot_of(cs.guard_key(cluster_server, service, "register", v.identity))
        ).id
        for v in verdicts
    }
    assert len(served) == len(all_masters) == 3


async def test_a_thousand_simultaneous_registrations_admit_exactly_the_limit(
    cluster_server: RunningServer,
) -> None:
    guard = await guard_client(cluster_server)
    limit = 7
    service = await new_service(guard, register_limit=limit)
    browser = fingerprint("race")
    verdicts = await asyncio.gather(
        *(
            guard.evaluate(service, "register", account(f"racer{i}"), browser, IP)
            for i in range(1000)
        )
    )
    allowed = [v for v in verdicts if v.verdict == pb.VERDICT_ALLOW]
    assert len(allowed) == limit
    assert not any(v.fail_open for v in verdicts)
    assert sorted(v.count for v in allowed) == list(range(1, limit + 1))


async def test_freeing_and_renewing_route_by_slot(cluster_server: RunningServer) -> None:
    guard = await guard_client(cluster_server)
    service = await new_service(guard, login_limit=1)
    browser = fingerprint("free")
    first = await guard.evaluate(service, "login", account("f1"), browser, IP)
    assert first.verdict == pb.VERDICT_ALLOW
    refused = await guard.evaluate(service, "login", account("f2"), browser, IP)
    assert refused.verdict == pb.VERDICT_DENY
    await guard.stub.RenewLogin(
        pb.RenewLoginRequest(service_id=service, identity=first.identity, account=account("f1"))
    )
    await guard.stub.EndLogin(
        pb.EndLoginRequest(service_id=service, identity=first.identity, account=account("f1"))
    )
    again = await guard.evaluate(service, "login", account("f2"), browser, IP)
    assert again.verdict == pb.VERDICT_ALLOW


@pytest.fixture
def pinned_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds the rate limiter's clock still, so no window ends during a test."""
    now = time.time()
    monkeypatch.setattr(rate_limit, "time", types_module.SimpleNamespace(time=lambda: now))


async def test_a_report_binds_and_the_rate_limit_holds_exactly(
    cluster_server: RunningServer, pinned_window: None
) -> None:
    partner_id, partner_token = await cluster_server.partner()
    phone = bs.phone_account()
    await bs.add_accounts(cluster_server, partner_token, [phone], reference="customer-1")
    devices = bs.stub(cluster_server, await cluster_server.credential("device"))
    dev = bs.device()
    bound = await devices.ReportAccountUse(bs.report_request(dev, phone))
    assert [o.outcome for o in bound.outcomes] == [binding_pb.REPORT_OUTCOME_BOUND]
    assert await bs.count_bindings(cluster_server, partner_id) == 1

    async def report() -> grpc.StatusCode:
        try:
            await devices.ReportAccountUse(bs.report_request(dev, bs.member()))
        except grpc.aio.AioRpcError as error:
            return details_of(error).code
        return grpc.StatusCode.OK

    codes = Counter(await asyncio.gather(*(report() for _ in range(100))))
    # The bound report was the first of the window.
    assert codes == {
        grpc.StatusCode.OK: RATE_LIMIT - 1,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 100 - RATE_LIMIT + 1,
    }
    # Another device has its own window, wherever its slot lives.
    await devices.ReportAccountUse(bs.report_request(bs.device(), bs.member()))


async def test_leftover_scratch_keys_are_found_on_every_master(
    cluster_server: RunningServer, redis_cluster_url: str
) -> None:
    client = connect(redis_cluster_url, 5.0)
    scope = keys.backtest_scope("leftover")
    # A key in each master's slots: scans must ask every master.
    leftovers = [
        f"{KEY_PREFIX}:{scope}:s:{{{tag_for_slot(m.first_slot)}}}:r:x"
        for m in await cs.masters(cs.seed_port(redis_cluster_url))
    ]
    try:
        for key in leftovers:
            await client.set(key, b"1")
        await guard_of(cluster_server).load()
        assert [await client.exists(key) for key in leftovers] == [0, 0, 0]
    finally:
        await client.aclose()


KEYED = re.compile(r"redis\.call\('(\w+)'(?:, *([^,)]+))?")


@pytest.mark.parametrize(
    "source",
    [
        scripts.EVALUATE,
        scripts.REMOVE,
        scripts.RENEW,
        scripts.RESTORE,
        rate_limit.RATE_LIMIT_SCRIPT,
    ],
    ids=["evaluate", "remove", "renew", "restore", "rate_limit"],
)
def test_every_script_touches_only_the_key_it_is_passed(source: str) -> None:
    # One key per script is one slot; any other key a script named would
    # live on another master (CROSSSLOT, or a MOVED the caller cannot follow).
    calls = KEYED.findall(source)
    assert calls
    for command, first in calls:
        if command == "TIME":
            continue
        assert first.strip() in ("key", "KEYS[1]"), f"{command} {first}"
    assert "KEYS[2]" not in source
    for line in source.splitlines():
        if re.search(r"\blocal key\b", line):
            assert "KEYS[1]" in line, line
