"""Redis trouble: the policy's fail mode within the time bound, recovery,
lost scripts, and rebuilding the counters from SQL. Each test runs its own redis-server,
which it stops, freezes or flushes; the shared one is never touched."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from tests.guard_support import (
    PrivateRedis,
    fingerprint,
    guard_client,
    guard_of,
    new_service,
    private_redis,
    restorer_of,
)
from tests.support import RunningServer, expect_error, start_server
from tether.clients.guard.client import GuardClient, account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.counters.pipelined import Script
from tether.server.guard import keys, rebuild, scripts
from tether.server.guard.convert import components
from tether.server.guard.counters import is_spilled
from tether.server.guard.service import AccountRef, Action, EvaluateCall

IP = "198.51.100.7"
# Generous: the server decides within TETHER_REDIS_TIMEOUT_SECONDS (0.25 s);
# this deadline only turns a hang into a failure instead of a stuck test.
NO_HANG = 10.0
COMPONENTS = components(fingerprint("loss"), present=True)
LANGUAGES = [
    "de-DE", "fr-FR", "es-ES", "it-IT", "nl-NL", "pl-PL", "pt-PT", "sv-SE", "da-DK", "fi-FI",
    "nb-NO", "cs-CZ", "hu-HU", "ro-RO", "el-GR", "tr-TR", "ru-RU", "uk-UA", "ja-JP", "ko-KR",
]  # fmt: skip


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    async with private_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def server(
    redis_server: PrivateRedis, postgres_url: str, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    running = await start_server(
        database_url=postgres_url,
        redis_url=redis_server.url,
        data_dir=tmp_path / "data",
        redis_timeout_seconds=0.25,
    )
    yield running
    await running.stop()


async def _evaluate(guard: GuardClient, service: str, name: str) -> pb.EvaluateResponse:
    return await guard.stub.Evaluate(
        pb.EvaluateRequest(
            service_id=service,
            action=pb.ACTION_REGISTER,
            account=account(name),
            components=fingerprint("loss"),
            client_ip=IP,
        ),
        timeout=NO_HANG,
    )


async def _until(condition: Callable[[], bool]) -> None:
    """Waits for something a background task does, with a bound."""
    deadline = time.monotonic() + NO_HANG
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _until_counted(guard: GuardClient, service: str, name: str) -> pb.EvaluateResponse:
    """After Redis returns, the client reconnects; poll, with a bound."""
    deadline = time.monotonic() + NO_HANG
    while True:
        verdict = await _evaluate(guard, service, name)
        if not verdict.fail_open or time.monotonic() > deadline:
            return verdict
        await asyncio.sleep(0.05)


async def test_the_layout_before_is_replaced_from_sql_at_the_first_start(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=1)
    first = await _evaluate(guard, service, "l1")
    # Redis as a server of the layout before left it: a hash per identity
    # (the identity last), its own restore marker, and none of this layout's.
    client = await redis_server.client()
    legacy = f"tether:g:{service}:{{0}}:r:{first.identity}"
    try:
        restores = restorer_of(server).restores
        # At once: the watcher must not find Redis empty in between.
        async with client.pipeline(transaction=True) as replace:
            replace.flushall()
            replace.hset(legacy, "x", "9007199254740991")
            replace.set("tether:g:restored", "1")
            await replace.execute()
        await _until(lambda: restorer_of(server).restores > restores)
        assert not await client.exists(legacy)
        assert await client.exists(f"tether:g:restored:{keys.LAYOUT}")
    finally:
        await client.aclose()
    # The registration counts in this layout, written back from SQL.
    assert (await _evaluate(guard, service, "l2")).verdict == pb.VERDICT_DENY


async def test_stopped_redis_fails_open_with_flag_then_recovers(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=1, redis_failure=pb.REDIS_FAILURE_FAIL_OPEN)
    assert (await _evaluate(guard, service, "before")).reason == pb.VERDICT_REASON_WITHIN_LIMIT
    await redis_server.stop()
    during = await _evaluate(guard, service, "during")
    assert during.verdict == pb.VERDICT_ALLOW
    assert during.fail_open
    assert during.reason == pb.VERDICT_REASON_COUNTERS_UNAVAILABLE
    await redis_server.start()
    # Redis came back empty (no persistence): the guard notices on its new
    # connection and restores the counts from SQL by itself; no call in
    # between is counted against an empty Redis.
    after = await _until_counted(guard, service, "after")
    assert not after.fail_open
    assert after.verdict == pb.VERDICT_DENY


async def test_stopped_redis_fails_closed_with_unavailable_then_recovers(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=1, redis_failure=pb.REDIS_FAILURE_FAIL_CLOSED)
    await redis_server.stop()
    await expect_error(
        _evaluate(guard, service, "during"),
        grpc.StatusCode.UNAVAILABLE,
        "ERROR_REASON_GUARD_COUNTERS_UNAVAILABLE",
    )
    await redis_server.start()
    deadline = time.monotonic() + NO_HANG
    while True:
        try:
            verdict = await _evaluate(guard, service, "after")
            break
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert verdict.verdict == pb.VERDICT_ALLOW
    assert not verdict.fail_open


async def test_frozen_redis_is_decided_within_the_bound_not_awaited(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=1)
    await _evaluate(guard, service, "warm")  # a pooled connection that will hang
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        frozen = await _evaluate(guard, service, "frozen")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert frozen.fail_open
    assert (await _until_counted(guard, service, "thawed")).verdict == pb.VERDICT_DENY


async def test_rebuild_after_flushall_restores_the_limits(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    service = await new_service(
        guard, register_limit=2, login_limit=1, collaborate_limit=1, login_session_seconds=600
    )
    browser = fingerprint("flush")
    for name in ("f1", "f2"):
        await guard.evaluate(service, "register", account(name), browser, IP)
    await guard.evaluate(service, "login", account("f1"), browser, IP)
    await guard.evaluate(service, "collaborate", account("f1"), browser, IP, room_id="k")
    cancelled = await guard.evaluate(service, "register", account("f2"), browser, IP)
    await guard.cancel_registration(service, cancelled.identity, account("f2"))
    await guard.evaluate(service, "register", account("f3"), browser, IP)

    restores = restorer_of(server).restores
    client = await redis_server.client()
    try:
        await client.flushall()
    finally:
        await client.aclose()
    # A flush closes no connection: the watcher notices the missing marker.
    await _until(lambda: restorer_of(server).restores > restores)
    assert await guard.rebuild(service) == 0  # all back already; rebuilding is idempotent

    checks = [
        ("register", "f4", ""),
        ("login", "f2", ""),
        ("collaborate", "f2", "k"),
    ]
    for action, name, room in checks:
        verdict = await guard.evaluate(service, action, account(name), browser, IP, room_id=room)
        assert verdict.verdict == pb.VERDICT_DENY, action
    again = await guard.evaluate(service, "register", account("f3"), browser, IP)
    assert again.reason == pb.VERDICT_REASON_ALREADY_COUNTED


async def test_redis_restarted_under_load_never_admits_beyond_the_limit(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    """Browsers at their limit keep trying while Redis restarts empty: none
    is admitted again, during the outage, the restore, or after."""
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=2, redis_failure=pb.REDIS_FAILURE_FAIL_CLOSED)
    # Twenty people: each differs from the others in every drifting group,
    # so a book that knows what is rare links none of them (twenty
    # browsers differing only by a font, from twenty networks within
    # seconds, are one farm's burst).
    browsers = [
        fingerprint(
            f"load{i}",
            browser_version=f"131.0.6778.{i}",
            screen_width=1280 + 16 * i,
            languages=[LANGUAGES[i]],
        )
        for i in range(20)
    ]
    networks = [f"198.51.{100 + i}.9" for i in range(20)]
    for i, browser in enumerate(browsers):
        for name in ("a", "b"):
            verdict = await guard.evaluate(
                service, "register", account(f"{i}{name}"), browser, networks[i]
            )
            assert verdict.verdict == pb.VERDICT_ALLOW
    admitted: list[str] = []
    stop = asyncio.Event()

    async def keep_trying(i: int) -> None:
        attempt = 0
        while not stop.is_set():
            attempt += 1
            name = f"{i}-x{attempt}"
            try:
                verdict = await guard.evaluate(
                    service, "register", account(name), browsers[i], networks[i]
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.01)
                continue
            if verdict.verdict == pb.VERDICT_ALLOW:
                admitted.append(name)

    workers = [asyncio.create_task(keep_trying(i)) for i in range(len(browsers))]
    restores = restorer_of(server).restores
    await redis_server.stop()
    await redis_server.start()
    await _until(lambda: restorer_of(server).restores > restores)
    # Counting goes on after the restore, against the restored counts.
    probe = await guard.evaluate(service, "register", account("probe"), browsers[0], networks[0])
    stop.set()
    await asyncio.gather(*workers)
    assert admitted == []
    assert probe.verdict == pb.VERDICT_DENY


async def test_flushed_scripts_are_loaded_again_and_counting_goes_on(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=2)
    assert (await _evaluate(guard, service, "s1")).count == 1
    client = await redis_server.client()
    try:
        await client.script_flush()  # as after a restart or a failover
    finally:
        await client.aclose()
    second = await _evaluate(guard, service, "s2")
    assert (second.verdict, second.count, second.fail_open) == (pb.VERDICT_ALLOW, 2, False)
    assert (await _evaluate(guard, service, "s3")).verdict == pb.VERDICT_DENY


async def test_a_started_server_has_loaded_its_script_before_the_first_call(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    # A fresh redis-server knew no script: the start loaded it, on the hot
    # path's connection, so the first call pays no NOSCRIPT retry.
    client = await redis_server.client()
    try:
        assert await client.script_exists(Script(scripts.EVALUATE).sha) == [True]
    finally:
        await client.aclose()
    await _first_counted(server, _evaluate)


async def test_a_server_started_while_redis_is_down_warms_nothing_and_counts_once_it_is_up(
    redis_server: PrivateRedis, postgres_url: str, tmp_path: Path
) -> None:
    await redis_server.stop()
    running = await start_server(
        database_url=postgres_url,
        redis_url=redis_server.url,
        data_dir=tmp_path / "data",
        redis_timeout_seconds=0.25,
    )
    try:
        await redis_server.start()
        await _first_counted(running, _until_counted)
    finally:
        await running.stop()


async def _first_counted(
    server: RunningServer,
    evaluate: Callable[[GuardClient, str, str], Awaitable[pb.EvaluateResponse]],
) -> None:
    """A new service's first registration is admitted and counted."""
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=1)
    first = await evaluate(guard, service, "first")
    assert (first.verdict, first.count, first.fail_open) == (pb.VERDICT_ALLOW, 1, False)


async def test_counters_use_the_urls_password_and_database(
    postgres_url: str, tmp_path: Path
) -> None:
    async with private_redis(tmp_path, password="s3cret", db=3) as redis_server:
        running = await start_server(
            database_url=postgres_url, redis_url=redis_server.url, data_dir=tmp_path / "data"
        )
        try:
            guard = await guard_client(running)
            service = await new_service(guard, register_limit=1)
            first = await _evaluate(guard, service, "p1")
            assert (first.verdict, first.fail_open) == (pb.VERDICT_ALLOW, False)
            assert (await _evaluate(guard, service, "p2")).verdict == pb.VERDICT_DENY
            pattern = f"tether:g:{service}:*"
            in_3 = await redis_server.client()
            in_0 = redis.Redis(port=redis_server.port, password="s3cret", db=0)
            try:
                assert await in_3.keys(pattern)
                assert not await in_0.keys(pattern)
            finally:
                await in_3.aclose()
                await in_0.aclose()
        finally:
            await running.stop()


async def test_a_call_its_caller_gave_up_disturbs_no_other_call(
    redis_server: PrivateRedis, postgres_url: str, tmp_path: Path
) -> None:
    running = await start_server(
        database_url=postgres_url, redis_url=redis_server.url, data_dir=tmp_path / "data"
    )
    try:
        guard = await guard_client(running)
        service = await new_service(guard, register_limit=5)
        await _evaluate(guard, service, "warm")  # the connection is open
        domain = guard_of(running)
        pipelined = domain.counters.pipelined
        assert pipelined is not None

        def call(name: str) -> EvaluateCall:
            return EvaluateCall(
                service, Action.REGISTER, AccountRef("login_id", name), "", COMPONENTS, IP
            )

        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            given_up = asyncio.create_task(domain.evaluate(call("given-up")))
            waiting = asyncio.create_task(domain.evaluate(call("waiting")))
            # Each task runs until it awaits its reply: one turn of the loop.
            await asyncio.sleep(0)
            assert pipelined.waiting == 2  # both sent, on the one connection
            given_up.cancel()  # as a client's deadline does
            with pytest.raises(asyncio.CancelledError):
                await given_up
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        verdict = await asyncio.wait_for(waiting, NO_HANG)
        assert (verdict.allowed, verdict.fail_open) == (True, False)
    finally:
        await running.stop()


async def test_redis_losing_its_data_during_a_restore_is_restored_again(
    server: RunningServer, redis_server: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=2)
    browser = fingerprint("twice")
    for name in ("t1", "t2"):
        await guard.evaluate(service, "register", account(name), browser, IP)

    client = await redis_server.client()
    real_rebuild = rebuild.rebuild
    losses: list[bool] = []

    async def rebuild_then_lose(*args: Any, **kwargs: Any) -> int:
        restored = await real_rebuild(*args, **kwargs)
        if not losses:
            # Redis restarts empty after the restore wrote, before it is marked.
            losses.append(await client.flushall())
        return restored

    monkeypatch.setattr(rebuild, "rebuild", rebuild_then_lose)
    restores = restorer_of(server).restores
    try:
        await client.flushall()
        # The first restore's work was lost with the data: it must not mark
        # Redis restored; the watcher restores again.
        await _until(lambda: restorer_of(server).restores > restores)
    finally:
        await client.aclose()
    assert losses
    third = await guard.evaluate(service, "register", account("t3"), browser, IP)
    assert (third.verdict, third.reason) == (pb.VERDICT_DENY, pb.VERDICT_REASON_REGISTER_LIMIT)


async def test_a_spilled_identity_is_restored_spilled_after_flushall(
    server: RunningServer, redis_server: PrivateRedis
) -> None:
    guard = await guard_client(server)
    limit = scripts.SPILL + 16
    service = await new_service(guard, register_limit=limit)
    browser = fingerprint("spilled-flush")
    for i in range(limit):
        verdict = await guard.evaluate(service, "register", account(f"sp{i}"), browser, IP)
        assert verdict.verdict == pb.VERDICT_ALLOW
    key = keys.counted(service, "register", "", verdict.identity, bits=guard_of(server).bucket_bits)
    spill = keys.spills(key, keys.field(verdict.identity))[0]

    restores = restorer_of(server).restores
    client = await redis_server.client()
    try:
        await client.flushall()
        await _until(lambda: restorer_of(server).restores > restores)
        # Written back as it was: a marker in the bucket, the accounts in
        # the identity's own keys.
        record = await client.hget(key, keys.field(verdict.identity))
        assert isinstance(record, bytes) and is_spilled(record)
        assert await client.hget(spill, "a") == b"%d" % limit
    finally:
        await client.aclose()
    refused = await guard.evaluate(service, "register", account("one-more"), browser, IP)
    assert (refused.verdict, refused.count) == (pb.VERDICT_DENY, limit)
    again = await guard.evaluate(service, "register", account("sp3"), browser, IP)
    assert again.reason == pb.VERDICT_REASON_ALREADY_COUNTED
