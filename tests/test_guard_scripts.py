"""The guard's scripts on the shared bucket hashes, on real Redis and on
embedded mode's fakeredis: records of one bucket kept apart, expired data
removed by the scripts (a shared hash cannot expire per identity), and the
bucket's own expiry. Times are given (a replay's clock) where a test needs
them exact; the key's expiry is checked on Redis's own clock."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from tether.server.counters.connection import connect
from tether.server.guard import keys, scripts
from tether.server.guard.counters import (
    FOREVER_MS,
    Count,
    Entry,
    GuardCounters,
    Record,
    decode,
)
from tether.server.guard.rules import Inputs

NETWORK = "00112233445566ff"
OTHER_NETWORK = "ffeeddccbbaa9988"
T0 = 1_800_000_000_000
RARE = Inputs(
    rare=True,
    rotation_ms=0,
    crowd=False,
    crowd_window_ms=0,
    crowd_threshold=0,
    velocity=(0, 0, 0, 0),
    popularity=0,
    rate=0.0,
    crowd_browsers=0,
    network_share=0.0,
)


@pytest.fixture(params=["redis", "fakeredis"])
async def counters(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[GuardCounters]:
    client = connect(redis_url if request.param == "redis" else "", 5.0)
    yield GuardCounters(client, 5.0, None)
    await client.aclose()


async def record_of(counters: GuardCounters, key: str, who: str) -> Record:
    value = await counters._client.hget(key, keys.field(who))
    assert isinstance(value, bytes)
    return decode(value)


def identity() -> str:
    return secrets.token_hex(16)


def bucket_key(action: str = "login") -> str:
    # Every identity of these tests in one bucket (0 bits), under a service of its own.
    return keys.counted(f"s{secrets.token_hex(4)}", action, "", "0" * 32, bits=0)


async def login(
    counters: GuardCounters,
    key: str,
    who: str,
    account: bytes,
    now_ms: int,
    *,
    life_ms: int = 1000,
    limit: int = 0,
    network: str = NETWORK,
) -> Count:
    return await counters.evaluate(
        key,
        keys.field(who),
        account,
        limit,
        life_ms,
        record_over=False,
        extend=True,
        now_ms=now_ms,
        network=network,
        inputs=RARE,
    )


async def test_identities_of_one_bucket_are_counted_apart(counters: GuardCounters) -> None:
    key = bucket_key()
    one, two = identity(), identity()
    for i in range(3):
        assert (await login(counters, key, one, b"one%05d" % i, T0, limit=3)).allowed
    assert not (await login(counters, key, one, b"one-four", T0, limit=3)).allowed
    assert (await login(counters, key, two, b"two-0001", T0, limit=3)).counted == 0
    assert (await login(counters, key, one, b"one00001", T0, limit=3)).already_counted
    assert await counters._client.hlen(key) == 2
    entries, farmed = await counters.entries(key, keys.field(one))
    assert sorted(e.member for e in entries) == [b"one%05d" % i for i in range(3)]
    assert farmed  # refused as one browser
    assert all(e.network == NETWORK and e.expire_ms == T0 + 1000 for e in entries)
    assert not (await counters.entries(key, keys.field(two)))[1]


async def test_a_popular_identity_counts_this_networks_accounts_by_their_place(
    counters: GuardCounters,
) -> None:
    # The record is searched in place: bytes equal to a network inside a
    # member (or a member inside a network) are no match.
    key = bucket_key()
    who = identity()
    popular = RARE._replace(rare=False)
    look_alike = bytes.fromhex(NETWORK)

    async def call(account: bytes, network: str) -> Count:
        return await counters.evaluate(
            key,
            keys.field(who),
            account,
            2,
            1000,
            record_over=False,
            extend=True,
            now_ms=T0,
            network=network,
            inputs=popular,
        )

    assert (await call(b"on-home1", NETWORK)).allowed
    assert (await call(look_alike, OTHER_NETWORK)).counted == 0
    assert (await call(b"on-home2", NETWORK)).counted == 1
    refused = await call(b"on-home3", NETWORK)
    assert (refused.allowed, refused.counted) == (False, 2)
    again = await call(look_alike, OTHER_NETWORK)
    assert (again.already_counted, again.counted) == (True, 1)


async def test_a_touched_record_drops_its_expired_accounts(counters: GuardCounters) -> None:
    key = bucket_key()
    who = identity()
    await login(counters, key, who, b"short-01", T0, life_ms=1000)
    await login(counters, key, who, b"long-001", T0, life_ms=60_000)
    await login(counters, key, who, b"later-01", T0 + 2000, life_ms=1000)
    record = await record_of(counters, key, who)
    assert [e.member for e in record.entries] == [b"long-001", b"later-01"]
    # The record lives as long as its latest account ever did.
    assert record.expire_ms == T0 + 60_000


async def test_identities_never_seen_again_are_swept_by_other_calls(
    counters: GuardCounters,
) -> None:
    key = bucket_key()
    gone = [identity() for _ in range(20)]
    for who in gone:
        await login(counters, key, who, b"account1", T0, life_ms=1000)
    assert await counters._client.hlen(key) == 20
    # Long after: one other identity keeps logging new accounts in; each
    # call looks at SWEEP random records and deletes those past their expiry.
    stays = identity()
    for i in range(200):
        await login(counters, key, stays, b"acct%04d" % i, T0 + 10_000, life_ms=60_000)
    assert await counters._client.hkeys(key) == [keys.field(stays)]


async def test_the_bucket_lives_as_long_as_its_latest_record(counters: GuardCounters) -> None:
    key = bucket_key()
    long, short = identity(), identity()
    await login(counters, key, long, b"account1", 0, life_ms=600_000)
    ttl = await counters._client.pttl(key)
    assert 590_000 < ttl <= 600_000
    # A shorter entry of another identity never shortens the bucket's life.
    await login(counters, key, short, b"account2", 0, life_ms=5_000)
    assert await counters._client.pttl(key) > 590_000
    # A registration without a window never expires: neither does its bucket.
    forever = await counters.evaluate(
        key,
        keys.field(short),
        b"account3",
        0,
        0,
        record_over=False,
        extend=False,
        now_ms=0,
        network=NETWORK,
        inputs=RARE,
    )
    assert forever.expire_ms == FOREVER_MS
    assert await counters._client.pttl(key) == -1
    entries, _ = await counters.entries(key, keys.field(short))
    assert FOREVER_MS in {e.expire_ms for e in entries}


async def test_remove_renew_and_restore_keep_the_record_whole(counters: GuardCounters) -> None:
    key = bucket_key("register")
    who = identity()
    velocity = RARE._replace(velocity=(0, 0, 0, 10))
    for i, account in enumerate((b"first-01", b"second01")):
        await counters.evaluate(
            key,
            keys.field(who),
            account,
            0,
            0,
            record_over=False,
            extend=False,
            now_ms=T0 + i,
            network=(NETWORK, OTHER_NETWORK)[i],
            inputs=velocity,
        )
    record = await record_of(counters, key, who)
    assert record.registration_ms == [T0, T0 + 1]
    assert [e.network for e in record.entries] == [NETWORK, OTHER_NETWORK]
    # Removing an account takes its registration time with it.
    assert await counters.remove(key, keys.field(who), b"first-01")
    assert not await counters.remove(key, keys.field(who), b"first-01")
    record = await record_of(counters, key, who)
    assert [e.member for e in record.entries] == [b"second01"]
    assert record.registration_ms == [T0 + 1]
    # Restoring adds what is missing and never shortens an entry.
    restored = [
        Entry(b"first-01", T0, FOREVER_MS, NETWORK),
        Entry(b"second01", T0 + 1, T0 + 5, OTHER_NETWORK),
    ]
    assert await counters.restore(key, keys.field(who), restored, now_ms=T0 + 2) == 1
    record = await record_of(counters, key, who)
    assert sorted(record.entries) == sorted(
        [
            Entry(b"first-01", T0, FOREVER_MS, NETWORK),
            Entry(b"second01", T0 + 1, FOREVER_MS, OTHER_NETWORK),
        ]
    )
    assert sorted(record.registration_ms) == [T0, T0 + 1]


async def test_renewing_a_login_extends_it_and_an_ended_one_is_gone(
    counters: GuardCounters,
) -> None:
    key = bucket_key()
    who = identity()
    first = await login(counters, key, who, b"account1", 0, life_ms=5_000)
    renewed = await counters.renew(key, keys.field(who), b"account1", 60_000)
    assert renewed > first.expire_ms
    (entry,), _ = await counters.entries(key, keys.field(who))
    assert entry.expire_ms == renewed
    assert await counters._client.pttl(key) > 55_000
    assert await counters.remove(key, keys.field(who), b"account1")
    assert await counters.renew(key, keys.field(who), b"account1", 60_000) == 0


def test_a_record_of_one_account_fits_a_compact_hash() -> None:
    # Redis keeps a hash compact (listpack) while its values stay within 64
    # bytes: a record of one account, with its registration time, does.
    assert scripts.HEAD + scripts.ENTRY + 6 <= 64
