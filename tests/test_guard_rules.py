"""FingerprintGuard's three rules (register, log in, collaborate) through
real gRPC, real PostgreSQL (or SQLite) and real Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import cast

import grpc
import redis.asyncio as redis

from tests.guard_support import (
    fingerprint,
    guard_client,
    guard_of,
    new_service,
)
from tests.provisioning_support import eventually
from tests.support import RunningServer, expect_error, start_server
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import counters, keys, rules
from tether.server.guard.signals import Occupancy, poisson_quantile

IP = "198.51.100.7"


async def test_register_limit_refuses_the_next_account_from_one_fingerprint(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    browser = fingerprint("one")
    for i in range(3):
        verdict = await guard.evaluate(service, "register", account(f"user{i}"), browser, IP)
        assert verdict.verdict == pb.VERDICT_ALLOW
        assert (verdict.count, verdict.limit) == (i + 1, 3)
    refused = await guard.evaluate(service, "register", account("user3"), browser, IP)
    assert refused.verdict == pb.VERDICT_DENY
    assert refused.reason == pb.VERDICT_REASON_REGISTER_LIMIT
    assert (refused.count, refused.limit) == (3, 3)
    other = await guard.evaluate(service, "register", account("user3"), fingerprint("two"), IP)
    assert other.verdict == pb.VERDICT_ALLOW
    assert other.identity != refused.identity


async def test_repeated_registration_of_one_account_counts_once(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=2)
    first = await guard.evaluate(service, "register", account("same"), fingerprint(), IP)
    again = await guard.evaluate(service, "register", account("same"), fingerprint(), IP)
    assert again.reason == pb.VERDICT_REASON_ALREADY_COUNTED
    assert (first.count, again.count) == (1, 1)


async def test_normalized_components_give_one_fingerprint(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=5)
    a = await guard.evaluate(service, "register", account("n1"), fingerprint(), IP)
    reordered = fingerprint(fonts=["Font a", "liberation serif", "DejaVu Sans "])
    b = await guard.evaluate(service, "register", account("n2"), reordered, "203.0.113.9")
    assert a.explanation.fingerprint == b.explanation.fingerprint
    assert a.identity == b.identity


async def test_cancelled_registration_frees_its_slot(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    first = await guard.evaluate(service, "register", account("c1"), fingerprint(), IP)
    assert await guard.cancel_registration(service, first.identity, account("c1"))
    assert not await guard.cancel_registration(service, first.identity, account("c1"))
    second = await guard.evaluate(service, "register", account("c2"), fingerprint(), IP)
    assert second.verdict == pb.VERDICT_ALLOW


async def test_logout_frees_a_login_slot(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=2, login_session_seconds=600)
    browser = fingerprint()
    a = await guard.evaluate(service, "login", account("a"), browser, IP)
    await guard.evaluate(service, "login", account("b"), browser, IP)
    refused = await guard.evaluate(service, "login", account("c"), browser, IP)
    assert refused.verdict == pb.VERDICT_DENY
    assert refused.reason == pb.VERDICT_REASON_LOGIN_LIMIT
    relogin = await guard.evaluate(service, "login", account("a"), browser, IP)
    assert relogin.reason == pb.VERDICT_REASON_ALREADY_COUNTED
    assert await guard.end_login(service, a.identity, account("a"))
    allowed = await guard.evaluate(service, "login", account("c"), browser, IP)
    assert allowed.verdict == pb.VERDICT_ALLOW
    assert allowed.expire_time.seconds > 0


async def test_an_expired_login_frees_its_slot_and_leaves_the_bucket(
    any_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=2, login_session_seconds=1)
    browser = fingerprint()
    short = await guard.evaluate(service, "login", account("short"), browser, IP)
    # The second login outlives the first, so the bucket stays alive.
    await guard.set_policy(
        pb.Policy(service_id=service, login_session_seconds=600), only=["login_session_seconds"]
    )
    long = await guard.evaluate(service, "login", account("long"), browser, IP)
    assert (short.verdict, long.verdict) == (pb.VERDICT_ALLOW, pb.VERDICT_ALLOW)
    full = await guard.evaluate(service, "login", account("third"), browser, IP)
    assert full.reason == pb.VERDICT_REASON_LOGIN_LIMIT

    client = redis.Redis.from_url(redis_url)
    try:

        async def redis_ms() -> int:
            seconds, micros = await client.time()
            return seconds * 1000 + micros // 1000

        async def short_expired() -> bool:
            return await redis_ms() > short.expire_time.ToMilliseconds()

        await eventually(short_expired, within=5, what="the first login's expiry")
        third = await guard.evaluate(service, "login", account("third"), browser, IP)
        assert third.verdict == pb.VERDICT_ALLOW
        assert (third.count, third.limit) == (2, 2)

        # Only the two live logins remain in the identity's record, the one
        # field of its bucket's hash (the written record dropped the expired one).
        (key,) = [k async for k in client.scan_iter(match=f"*:g:{service}:*:l")]
        # Raw bytes: this client does not decode responses.
        fields = cast(dict[bytes, bytes], await client.hgetall(key))
        now = await redis_ms()
        assert list(fields) == [keys.field(third.identity)]
        record = counters.decode(fields[keys.field(third.identity)])
        assert len(record.entries) == 2
        assert all(entry.expire_ms > now for entry in record.entries)
        assert record.expire_ms == max(entry.expire_ms for entry in record.entries)
    finally:
        await client.aclose()


async def test_renewed_login_gets_a_later_expiry_and_ended_one_cannot_renew(
    pg_server: RunningServer,
) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, login_limit=1, login_session_seconds=300)
    login = await guard.evaluate(service, "login", account("r"), fingerprint(), IP)
    renewed = await guard.renew_login(service, login.identity, account("r"))
    assert renewed.expire_time.ToMilliseconds() >= login.expire_time.ToMilliseconds()
    await guard.end_login(service, login.identity, account("r"))
    await expect_error(
        guard.renew_login(service, login.identity, account("r")),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_GUARD_LOGIN_NOT_FOUND",
    )


async def test_room_limit_counts_accounts_of_one_fingerprint_per_room(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, collaborate_limit=2)
    browser = fingerprint()
    for name in ("p1", "p2"):
        ok = await guard.evaluate(
            service, "collaborate", account(name), browser, IP, room_id="room-a"
        )
        assert ok.verdict == pb.VERDICT_ALLOW
    refused = await guard.evaluate(
        service, "collaborate", account("p3"), browser, IP, room_id="room-a"
    )
    assert refused.reason == pb.VERDICT_REASON_COLLABORATE_LIMIT
    elsewhere = await guard.evaluate(
        service, "collaborate", account("p3"), browser, IP, room_id="room-b"
    )
    assert elsewhere.verdict == pb.VERDICT_ALLOW
    friend = await guard.evaluate(
        service, "collaborate", account("p3"), fingerprint("friend"), IP, room_id="room-a"
    )
    assert friend.verdict == pb.VERDICT_ALLOW
    assert await guard.leave_room(service, "room-a", refused.identity, account("p1"))
    rejoin = await guard.evaluate(
        service, "collaborate", account("p3"), browser, IP, room_id="room-a"
    )
    assert rejoin.verdict == pb.VERDICT_ALLOW


async def test_shadow_mode_never_denies_but_reports(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1, mode=pb.MODE_SHADOW)
    first = await guard.evaluate(service, "register", account("s1"), fingerprint(), IP)
    assert (first.verdict, first.would_deny) == (pb.VERDICT_ALLOW, False)
    for i, name in enumerate(("s2", "s3")):
        over = await guard.evaluate(service, "register", account(name), fingerprint(), IP)
        assert over.verdict == pb.VERDICT_ALLOW
        assert over.would_deny
        assert over.reason == pb.VERDICT_REASON_REGISTER_LIMIT
        assert over.count == i + 2
    await guard.set_policy(pb.Policy(service_id=service, mode=pb.MODE_ENFORCE), only=["mode"])
    enforced = await guard.evaluate(service, "register", account("s4"), fingerprint(), IP)
    assert enforced.verdict == pb.VERDICT_DENY


async def test_allow_listed_accounts_and_identities_are_never_limited(
    pg_server: RunningServer,
) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    cafe = fingerprint("cafe")
    first = await guard.evaluate(service, "register", account("x1"), cafe, IP)
    await guard.set_policy(
        pb.Policy(service_id=service),
        only=["allowed_accounts"],
        allowed_accounts=[account("staff")],
    )
    staff = await guard.evaluate(service, "register", account("staff"), cafe, IP)
    assert staff.reason == pb.VERDICT_REASON_ACCOUNT_ALLOW_LISTED
    assert (await guard.evaluate(service, "register", account("x2"), cafe, IP)).verdict == (
        pb.VERDICT_DENY
    )
    await guard.set_policy(
        pb.Policy(service_id=service, allowed_identities=[first.identity]),
        only=["allowed_identities"],
    )
    for name in ("x2", "x3", "x4"):
        verdict = await guard.evaluate(service, "register", account(name), cafe, IP)
        assert verdict.reason == pb.VERDICT_REASON_IDENTITY_ALLOW_LISTED
    policy = await guard.get_policy(service)
    assert policy.register_limit == 1
    assert len(policy.allowed_account_digests) == 1


async def test_policy_change_applies_without_restart(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    await guard.evaluate(service, "register", account("p1"), fingerprint(), IP)
    await guard.set_policy(pb.Policy(service_id=service, register_limit=2), only=["register_limit"])
    more = await guard.evaluate(service, "register", account("p2"), fingerprint(), IP)
    assert more.verdict == pb.VERDICT_ALLOW
    listed = [p.service_id async for p in guard.list_policies()]
    assert service in listed


async def test_look_ups_link_identities_and_accounts(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=5, login_limit=5)
    home = await guard.evaluate(service, "register", account("me"), fingerprint("home"), IP)
    await guard.evaluate(service, "register", account("alt"), fingerprint("home"), IP)
    work = await guard.evaluate(service, "login", account("me"), fingerprint("work"), IP)
    await guard.rebuild(service)  # also waits until the written-behind links are in SQL
    linked = [link async for link in guard.identity_accounts(home.identity)]
    assert len(linked) == 2
    assert {link.service_id for link in linked} == {service}
    identities = [link.identity async for link in guard.account_identities(account("me"))]
    assert set(identities) == {home.identity, work.identity}


async def test_a_returning_browser_reuses_its_kept_explanation(any_server: RunningServer) -> None:
    """A returning browser's explanation (and its message) is kept, keyed by
    everything it reads: its counting inputs among them. An input that
    changed with every call (the book's age, at full precision) made every
    repeat build both again."""
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=5)
    browser = fingerprint(secrets.token_hex(4))
    await guard.evaluate(service, "login", account("back"), browser, IP)
    await guard.evaluate(service, "login", account("back"), browser, IP)
    kept = guard_of(any_server).decider._explanations
    before = len(kept)
    for _ in range(6):
        again = await guard.evaluate(service, "login", account("back"), browser, IP)
        assert again.verdict == pb.VERDICT_ALLOW
    # At most one more: a rate slot or an hour may turn between calls.
    assert len(kept) - before <= 1


async def test_policy_change_reaches_another_server_without_restart(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    other = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        guard_policy_cache_seconds=0.1,
    )
    try:
        here, there = await guard_client(pg_server), await guard_client(other)
        service = await new_service(here, register_limit=1)
        await there.evaluate(service, "register", account("o1"), fingerprint("o"), IP)
        refused = await there.evaluate(service, "register", account("o2"), fingerprint("o"), IP)
        assert refused.verdict == pb.VERDICT_DENY
        await here.set_policy(pb.Policy(service_id=service, mode=pb.MODE_SHADOW), only=["mode"])
        # The other server rereads within its cache time; poll, with a bound.
        deadline = time.monotonic() + 10
        while True:
            verdict = await there.evaluate(service, "register", account("o2"), fingerprint("o"), IP)
            if verdict.verdict == pb.VERDICT_ALLOW or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert verdict.would_deny
    finally:
        await other.stop()


def test_beyond_the_hour_a_velocity_window_allows_the_shorter_ones_threshold_and_more() -> None:
    """A burst the hour window judged does not keep out, for six hours after
    it ended, the strangers who share a popular fingerprint: a longer window
    allows the shorter one's threshold plus what the rate explains for the
    rest of it (and never less than the rate alone explains over it)."""
    for rate in (0.0, 0.25, 2.0, 30.0):
        t10, t1h, t6h, t24h = rules.velocity_thresholds(rate, 3)
        assert 3 <= t10 <= t1h
        assert t6h >= t1h + poisson_quantile(rate * 5, rules.VELOCITY_TAIL)
        assert t24h >= t6h + poisson_quantile(rate * 18, rules.VELOCITY_TAIL)
        assert t6h >= poisson_quantile(rate * 6, rules.VELOCITY_TAIL) + 1
    # A browser first seen this hour has no rate: the limit, in every window.
    assert rules.velocity_thresholds(0.0, 3) == (3, 3, 3, 3)


def test_a_velocity_threshold_stays_a_few_deviations_above_a_large_mean() -> None:
    """A phone everyone owns may be seen 60 times an hour: its day's
    threshold is a Poisson tail over a mean of about 1,400, a little above
    it. (Summed from e^-mean, which underflows to 0 beyond a mean of about
    745, the tail was never reached and the threshold came out as 100,000:
    no check at all.)"""
    for mean in (1.0, 30.0, 700.0, 744.0, 746.0, 1_440.0, 20_000.0):
        q = poisson_quantile(mean, rules.VELOCITY_TAIL)
        # The tail at 1e-4 lies 3.7 standard deviations out; the Poisson's
        # skew puts it a little further for small means.
        assert mean + 3.5 * mean**0.5 <= q <= mean + 4.5 * mean**0.5 + 5, (mean, q)
    # Continuous where the old sum gave out.
    assert 0 <= poisson_quantile(746.0, 1e-4) - poisson_quantile(744.0, 1e-4) <= 3


def test_a_sighting_older_than_the_horizon_leaves_a_busy_keys_count_alone() -> None:
    """A busy key's counts sit in a ring of the horizon's slots: a sighting
    that comes late, from before the horizon, shares its place with a slot
    of now and must not overwrite that slot's count. The key is seen 5
    times in each 10-minute slot for 7 days and a half; the late sighting's
    place is two slots before the last, and it reads as if it came in
    time."""
    slot, horizon = 600.0, 7 * 24 * 3600.0
    start = 1_790_812_800.0
    recent = [start + i * 120.0 for i in range(1100 * 5)]
    old = start + 1097 * slot - horizon
    in_order = Occupancy(slot, horizon, 24 * 3600.0, by_chunk=True)
    late = Occupancy(slot, horizon, 24 * 3600.0, by_chunk=True)
    for t in [old, *recent]:
        in_order.see("phone", t)
    for t in [*recent, old]:
        late.see("phone", t)
    now = start + 1100 * slot + 3600.0
    assert late.rate("phone", now, 3600.0) == in_order.rate("phone", now, 3600.0) > 0
