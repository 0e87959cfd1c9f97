"""Tether on a Redis Cluster (3 masters, 3 replicas), through real gRPC:
every Redis path routed by slot, exact limits, redirections, and a master
killed under load. The shared local cluster (scripts/redis-cluster) serves
the tests that only use it; the ones that migrate slots or kill a master
run a private cluster of their own."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import types as types_module
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests import binding_support as bs
from tests import cluster_support as cs
from tests.guard_support import (
    fingerprint,
    guard_client,
    guard_of,
    new_service,
    race_of_registrations,
    restorer_of,
)
from tests.support import RunningServer, start_server
from tests.test_guard_backtest import T0, event, replay
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.clients.errors import details_of
from tether.clients.guard.client import GuardClient, account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.app import build
from tether.server.binding import rate_limit
from tether.server.counters.cluster import tag_for_slot
from tether.server.counters.connection import KEY_PREFIX, connect
from tether.server.counters.pipelined import Script
from tether.server.guard import counters, keys, scripts
from tether.server.settings import Settings
from tether.server.shared import digests

IP = "198.51.100.7"
# Only turns a hang into a failure: the server decides within its Redis bound.
NO_HANG = 10.0
RATE_LIMIT = 20
# PostgreSQL allows 100 connections to every test run on the machine.
POOL = 4


@pytest.fixture(scope="module")
async def cluster_server(
    postgres_url: str, redis_cluster_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    server = await start_server(
        database_pool_size=POOL,
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
    await race_of_registrations(cluster_server, IP)


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


async def test_a_cluster_node_named_as_a_single_redis_gets_the_fail_mode_not_internal(
    postgres_url: str, redis_cluster_url: str, tmp_path: Path
) -> None:
    # Most slots answer MOVED to a client that does not know it talks to a
    # cluster: the policy's fail mode, never INTERNAL. Told it is a cluster
    # (TETHER_REDIS_CLUSTER), the same URL counts every call.
    node = f"redis://127.0.0.1:{cs.seed_port(redis_cluster_url)}"
    for cluster in (False, True):
        server = await start_server(
            database_pool_size=POOL,
            database_url=postgres_url,
            redis_url=node,
            data_dir=tmp_path / str(cluster),
            redis_cluster=cluster,
            redis_timeout_seconds=0.25,
        )
        try:
            guard = await guard_client(server)
            service = await new_service(
                guard, register_limit=3, redis_failure=pb.REDIS_FAILURE_FAIL_OPEN
            )
            verdicts = [
                await guard.evaluate(
                    service,
                    "register",
                    account(f"n{i}"),
                    fingerprint(f"n{i}", screen_width=900 + i),
                    IP,
                )
                for i in range(12)
            ]
            assert all(v.verdict == pb.VERDICT_ALLOW for v in verdicts)
            assert any(v.fail_open for v in verdicts) is not cluster
        finally:
            await server.stop()


@pytest.mark.parametrize(
    ("url", "flag", "says"),
    [
        ("redis+cluster://127.0.0.1", False, "not host:port"),
        ("redis+cluster://127.0.0.1:7101,:7102", False, "not host:port"),
        ("rediss+cluster://127.0.0.1:7101", False, "over TLS is not supported"),
        ("rediss://127.0.0.1:7101", True, "over TLS is not supported"),
    ],
)
async def test_a_cluster_url_it_cannot_use_stops_the_start_naming_the_setting(
    tmp_path: Path, url: str, flag: bool, says: str
) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        data_dir=tmp_path,
        redis_url=url,
        redis_cluster=flag,
        digest_keys=digests.new_key_spec(),
    )
    with pytest.raises(SystemExit, match=f"TETHER_REDIS_URL: .*{says}"):
        await build(settings)


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


async def test_a_backtest_runs_on_every_master_and_leaves_nothing(
    cluster_server: RunningServer, redis_cluster_url: str
) -> None:
    guard = await guard_client(cluster_server)
    service = await new_service(guard)
    farm = fingerprint("bt-farm")
    events = [event(T0 + i, f"farmed{i}", farm, "10.9.0.1") for i in range(5)]
    # Strangers' browsers: their keys spread over every master.
    events += [
        event(T0 + 10 + i, f"s{i}", fingerprint(f"bt{i}", screen_width=700 + i), f"10.9.1.{i}")
        for i in range(30)
    ]
    verdicts, summary = await replay(guard, pb.Policy(service_id=service, register_limit=2), events)
    assert len(verdicts) == 35
    assert summary.total.refused == 3
    client = connect(redis_cluster_url, 5.0)
    try:
        left = [k async for k in client.scan_iter(match=f"{KEY_PREFIX}:bt:*", count=1000)]
    finally:
        await client.aclose()
    assert left == []


KEYED = re.compile(r"redis\.p?call\(\s*['\"](\w+)['\"]\s*(?:,\s*([^,)]+))?")


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
    # Every call is one the pattern read (no command named by a variable).
    assert calls
    assert len(calls) == len(re.findall(r"redis\.p?call\(", source))
    for command, first in calls:
        if command == "TIME":
            continue
        # A spilled identity's own keys (KEYS[2-4]) share its bucket's slot.
        assert first.strip() in ("key", "KEYS[1]", "spill", "expiries", "admissions", "k"), (
            f"{command} {first}"
        )
    assert "KEYS[5]" not in source
    for line in source.splitlines():
        if re.search(r"\blocal key\b", line):
            assert "KEYS[1]" in line, line


@pytest.fixture(scope="module")
async def private_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[cs.PrivateCluster]:
    """A cluster of the module's own, whose slots and masters tests move and kill."""
    cluster = cs.PrivateCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


async def _on_private_cluster(
    cluster: cs.PrivateCluster, postgres_url: str, data_dir: Path, **overrides: float
) -> RunningServer:
    return await start_server(
        database_pool_size=POOL,
        database_url=postgres_url,
        redis_url=cluster.url,
        data_dir=data_dir,
        **overrides,
    )


async def test_a_migrating_slot_is_followed_through_ask_then_moved(
    private_cluster: cs.PrivateCluster, postgres_url: str, tmp_path: Path
) -> None:
    server = await _on_private_cluster(private_cluster, postgres_url, tmp_path)
    try:
        guard = await guard_client(server)
        service = await new_service(guard, register_limit=10)
        browser = fingerprint("migrating")
        first = await guard.evaluate(service, "register", account("m0"), browser, IP)
        key = cs.guard_key(server, service, "register", first.identity)
        slot = cs.slot_of(key)
        all_masters = await cs.masters(private_cluster.base)
        source = cs.master_of_slot(all_masters, slot)
        target = next(m for m in all_masters if m.id != source.id)
        source_port, target_port = source.address[1], target.address[1]
        await cs.node_command(target_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        await cs.node_command(source_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
        moving = await cs.node_command(source_port, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert isinstance(moving, list) and key.encode() in moving
        await cs.node_command(
            source_port, "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *moving
        )
        # The source answers ASK: the call goes to the target once, after ASKING.
        asked = await guard.evaluate(service, "register", account("m1"), browser, IP)
        assert (asked.verdict, asked.count, asked.fail_open) == (pb.VERDICT_ALLOW, 2, False)
        for master in all_masters:
            await cs.node_command(master.address[1], "CLUSTER", "SETSLOT", slot, "NODE", target.id)
        # The slot is the target's now: the source answers MOVED.
        moved = await guard.evaluate(service, "register", account("m2"), browser, IP)
        assert (moved.verdict, moved.count, moved.fail_open) == (pb.VERDICT_ALLOW, 3, False)
        record = await cs.node_command(target_port, "HGET", key, keys.field(moved.identity))
        assert isinstance(record, bytes)
        assert len(counters.decode(record).entries) == 3
    finally:
        await server.stop()


async def test_a_started_server_has_loaded_its_script_on_every_master(
    private_cluster: cs.PrivateCluster, postgres_url: str, tmp_path: Path
) -> None:
    # Scripts lost everywhere (as after a restart of every node): the start
    # loads the counting script on each master, through the hot path's
    # connection to it, before the first call.
    evaluate = Script(scripts.EVALUATE).sha
    all_masters = await cs.masters(private_cluster.base)
    for master in all_masters:
        await cs.node_command(master.address[1], "SCRIPT", "FLUSH")
    server = await _on_private_cluster(private_cluster, postgres_url, tmp_path)
    try:
        for master in all_masters:
            assert await cs.node_command(master.address[1], "SCRIPT", "EXISTS", evaluate) == [1]
    finally:
        await server.stop()


async def test_a_flushed_master_gets_its_slots_back_from_sql(
    private_cluster: cs.PrivateCluster, postgres_url: str, tmp_path: Path
) -> None:
    server = await _on_private_cluster(private_cluster, postgres_url, tmp_path)
    try:
        guard = await guard_client(server)
        service = await new_service(guard, register_limit=2)
        browser = fingerprint("flushed")
        for name in ("f1", "f2"):
            admitted = await guard.evaluate(service, "register", account(name), browser, IP)
            assert admitted.verdict == pb.VERDICT_ALLOW
        key = cs.guard_key(server, service, "register", admitted.identity)
        master = cs.master_of_slot(await cs.masters(private_cluster.base), cs.slot_of(key))
        restores = restorer_of(server).restores
        await cs.node_command(master.address[1], "FLUSHALL")
        # A flush closes no connection: the watcher finds that master's marker gone.
        await _until(lambda: restorer_of(server).restores > restores)
        assert await guard.rebuild(service) == 0  # all back already
        refused = await guard.evaluate(service, "register", account("f3"), browser, IP)
        assert refused.verdict == pb.VERDICT_DENY
    finally:
        await server.stop()


@dataclass
class Load:
    """Evaluate calls of one browser, one after another, and what each got."""

    guard: GuardClient
    services: dict[str, str]  # "open" / "closed" -> service id
    browser: pb.FingerprintComponents
    accounts: dict[str, str]
    outcomes: list[tuple[float, str, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            for mode, service in self.services.items():
                self.outcomes.append(
                    (time.monotonic(), mode, await self._one(service, self.accounts[mode]))
                )

    async def _one(self, service: str, name: str) -> str:
        try:
            verdict = await self.guard.stub.Evaluate(
                pb.EvaluateRequest(
                    service_id=service,
                    action=pb.ACTION_REGISTER,
                    account=account(name),
                    components=self.browser,
                    client_ip=IP,
                ),
                timeout=NO_HANG,
            )
        except grpc.aio.AioRpcError as error:
            detail = details_of(error)
            if detail.code == grpc.StatusCode.UNAVAILABLE:
                return f"unavailable:{detail.reason}"
            return f"error:{detail.code.name}:{detail.message}"
        if verdict.fail_open:
            return "fail_open"
        return "counted" if verdict.reason == pb.VERDICT_REASON_ALREADY_COUNTED else "other"


async def test_a_killed_master_fails_over_without_raising_a_limit(
    private_cluster: cs.PrivateCluster, postgres_url: str, tmp_path: Path
) -> None:
    bound = 0.25
    server = await _on_private_cluster(
        private_cluster, postgres_url, tmp_path, redis_timeout_seconds=bound
    )
    limit = 6
    try:
        guard = await guard_client(server)
        closed = await new_service(
            guard, register_limit=limit, redis_failure=pb.REDIS_FAILURE_FAIL_CLOSED
        )
        opened = await new_service(
            guard, register_limit=limit, redis_failure=pb.REDIS_FAILURE_FAIL_OPEN
        )
        browser = fingerprint("failover")
        for i in range(limit - 3):
            admitted = await guard.evaluate(closed, "register", account(f"c{i}"), browser, IP)
            assert admitted.verdict == pb.VERDICT_ALLOW
        assert (await guard.evaluate(opened, "register", account("o0"), browser, IP)).verdict == (
            pb.VERDICT_ALLOW
        )
        key = cs.guard_key(server, closed, "register", admitted.identity)
        master = cs.master_of_slot(await cs.masters(private_cluster.base), cs.slot_of(key))
        replica = next(n for n in await cs.nodes(private_cluster.base) if n.master_id == master.id)
        master_pid = await cs.process_id(master.address[1])
        replica_pid = await cs.process_id(replica.port)

        # The replica misses the last two registrations: its master admitted
        # them (and SQL has them) while the replica was frozen and cut off
        # (a frozen process still receives into its socket), then the master dies.
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            await cs.node_command(master.address[1], "CLIENT", "KILL", "TYPE", "replica")
            for i in range(limit - 3, limit - 1):
                late = await guard.evaluate(closed, "register", account(f"c{i}"), browser, IP)
                assert late.verdict == pb.VERDICT_ALLOW
            load = Load(
                guard, {"closed": closed, "open": opened}, browser, {"closed": "c0", "open": "o0"}
            )
            running = asyncio.create_task(load.run())
            await _until(lambda: len(load.outcomes) >= 20)
            killed_at = time.monotonic()
            os.kill(master_pid, signal.SIGKILL)
        finally:
            os.kill(replica_pid, signal.SIGCONT)

        def recovered() -> bool:
            after = [o for t, _, o in load.outcomes if t > killed_at]
            failed = [i for i, o in enumerate(after) if o != "counted"]
            # Both services answered normally since the first failure.
            return bool(failed) and after[failed[-1] + 1 :].count("counted") >= 4

        await _until(recovered, seconds=60)
        load.stop.set()
        await running

        during = [(t, mode, o) for t, mode, o in load.outcomes if t > killed_at]
        modes = Counter((mode, o) for _, mode, o in during)
        # The policy's fail mode, and nothing else, until the replica took over.
        assert set(modes) <= {
            ("closed", "counted"),
            ("open", "counted"),
            ("closed", "unavailable:ERROR_REASON_GUARD_COUNTERS_UNAVAILABLE"),
            ("open", "fail_open"),
        }, modes
        assert modes[("open", "fail_open")] > 0
        assert modes[("closed", "unavailable:ERROR_REASON_GUARD_COUNTERS_UNAVAILABLE")] > 0
        last_failure = max(t for t, _, o in during if o != "counted")
        print(
            f"\nfailover: service back {last_failure - killed_at:.2f} s after SIGKILL;"
            f" {sum(o != 'counted' for _, _, o in during)} calls got the fail mode"
            f" ({modes[('open', 'fail_open')]} fail-open,"
            f" {modes[('closed', 'unavailable:ERROR_REASON_GUARD_COUNTERS_UNAVAILABLE')]}"
            f" UNAVAILABLE) of {len(during)}; restores: {restorer_of(server).restores}"
        )
        # The new master's slots came back from SQL: the two registrations
        # its copy lacked still count, so one more is admitted, not three.
        verdicts = await asyncio.gather(
            *(
                guard.evaluate(closed, "register", account(f"after{i}"), browser, IP)
                for i in range(20)
            )
        )
        assert sum(v.verdict == pb.VERDICT_ALLOW for v in verdicts) == 1
        assert not any(v.fail_open for v in verdicts)

        # The killed node comes back as a replica; the cluster is whole again.
        await private_cluster.start()
        roles = {n.port: n.role for n in await cs.nodes(private_cluster.base)}
        assert roles[master.address[1]] == "slave"
        assert roles[replica.port] == "master"
        again = await guard.evaluate(closed, "register", account("c0"), browser, IP)
        assert again.reason == pb.VERDICT_REASON_ALREADY_COUNTED
    finally:
        await server.stop()


async def _until(condition: Callable[[], bool], seconds: float = NO_HANG) -> None:
    """Waits for what a running load or the cluster does, with a bound."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
