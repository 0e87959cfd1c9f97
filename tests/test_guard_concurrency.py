"""Exactness under concurrency, and expiry, through real gRPC and Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as redis

from tests.guard_support import fingerprint, guard_client, new_service, race_of_registrations
from tests.support import RunningServer, start_server
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import counters, keys, scripts

IP = "198.51.100.7"


async def _ttl_ms(
    server: RunningServer, redis_url: str, action: str, service: str, identity: str
) -> int:
    """What is left of the lifetime of identity's counter key, in ms."""
    client = redis.Redis.from_url(redis_url)
    try:
        bits = server.app.settings.guard_bucket_bits
        ttl: int = await client.pttl(keys.counted(service, action, "", identity, bits=bits))
        return ttl
    finally:
        await client.aclose()


async def test_a_thousand_simultaneous_registrations_admit_exactly_the_limit(
    pg_server: RunningServer,
) -> None:
    await race_of_registrations(pg_server, IP)


async def test_registrations_racing_past_the_spill_admit_exactly_the_limit(
    pg_server: RunningServer,
) -> None:
    # The identity's record spills into keys of its own (past SPILL
    # accounts) in the middle of the race: the counts stay exact across it.
    assert 7 < scripts.SPILL < 100
    await race_of_registrations(pg_server, IP, racers=150, limit=100)


async def test_simultaneous_logins_admit_exactly_the_limit(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, login_limit=3)
    verdicts = await asyncio.gather(
        *(
            guard.evaluate(service, "login", account(f"l{i}"), fingerprint("l"), IP)
            for i in range(300)
        )
    )
    assert sum(v.verdict == pb.VERDICT_ALLOW for v in verdicts) == 3


async def test_expired_login_session_frees_its_slot(
    pg_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, login_limit=1, login_session_seconds=1)
    browser = fingerprint("expiry")
    first = await guard.evaluate(service, "login", account("e1"), browser, IP)
    assert first.verdict == pb.VERDICT_ALLOW
    # The key expires with its last session, so nothing lingers in Redis.
    ttl = await _ttl_ms(pg_server, redis_url, "login", service, first.identity)
    assert 0 < ttl <= 1000
    assert (await guard.evaluate(service, "login", account("e2"), browser, IP)).verdict == (
        pb.VERDICT_DENY
    )
    # Nothing can be awaited for an expiry: poll, with a bound.
    deadline = time.monotonic() + 10
    while True:
        verdict = await guard.evaluate(service, "login", account("e2"), browser, IP)
        if verdict.verdict == pb.VERDICT_ALLOW or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert verdict.verdict == pb.VERDICT_ALLOW


async def test_registration_window_bounds_the_key_lifetime(
    pg_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=2, register_window_seconds=60)
    first = await guard.evaluate(service, "register", account("w1"), fingerprint("w"), IP)
    ttl = await _ttl_ms(pg_server, redis_url, "register", service, first.identity)
    assert 0 < ttl <= 60_000


async def test_identities_sharing_one_hash_tag_are_counted_apart(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    server = await start_server(
        database_url=postgres_url, redis_url=redis_url, data_dir=tmp_path, guard_bucket_bits=0
    )
    try:
        guard = await guard_client(server)
        service = await new_service(guard, register_limit=2)
        identities = set()
        for seed in ("a", "b", "c"):
            # Three unrelated browsers: other fonts, screens and languages.
            browser = fingerprint(
                seed, screen_width=1000 + ord(seed), languages=[f"{seed}{seed}-XX"]
            )
            verdicts = await asyncio.gather(
                *(
                    guard.evaluate(service, "register", account(f"{seed}{i}"), browser, IP)
                    for i in range(50)
                )
            )
            assert sum(v.verdict == pb.VERDICT_ALLOW for v in verdicts) == 2
            identities |= {v.identity for v in verdicts}
        assert len(identities) == 3
        client = redis.Redis.from_url(redis_url)
        try:
            for identity in identities:
                key = keys.counted(service, "register", "", identity, bits=0)
                assert "{0}" in key
                # One bucket, one hash: each identity its own record in it.
                assert await client.hlen(key) == 3
                value = await client.hget(key, keys.field(identity))
                assert isinstance(value, bytes)
                assert len(counters.decode(value).entries) == 2
        finally:
            await client.aclose()
    finally:
        await server.stop()
