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
    evaluation,
)
from tether.server.guard.counters import (
    is_spilled as is_spilled_record,
)
from tether.server.guard.rules import Inputs

NETWORK = "00112233445566ff"
OTHER_NETWORK = "ffeeddccbbaa9988"
THIRD_NETWORK = "0123456789abcdef"
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
    sharers=0.0,
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
        evaluation(
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
            evaluation(
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
        evaluation(
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
            evaluation(
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


POPULAR = RARE._replace(rare=False)


async def register(
    counters: GuardCounters,
    key: str,
    who: str,
    account: bytes,
    now_ms: int,
    *,
    inputs: Inputs = POPULAR,
    network: str = NETWORK,
    life_ms: int = 0,
    limit: int = 10_000,
) -> Count:
    return await counters.evaluate(
        evaluation(
            key,
            keys.field(who),
            account,
            limit,
            life_ms,
            record_over=False,
            extend=False,
            now_ms=now_ms,
            network=network,
            inputs=inputs,
        )
    )


async def is_spilled(counters: GuardCounters, key: str, who: str) -> bool:
    value = await counters._client.hget(key, keys.field(who))
    assert isinstance(value, bytes)
    return is_spilled_record(value)


async def test_an_identity_spills_past_the_threshold_and_counts_the_same(
    counters: GuardCounters,
) -> None:
    key = bucket_key("register")
    who = identity()
    crowd = POPULAR._replace(crowd=True, crowd_window_ms=50_000, crowd_threshold=1000)
    rotating = RARE._replace(rotation_ms=30_000)
    total = scripts.SPILL + 40
    networks = (NETWORK, OTHER_NETWORK)
    for i in range(total):
        t = T0 + i * 1000
        network = networks[i % 2]
        on_network = i // 2
        # This network's accounts (a popular identity)...
        count = await register(counters, key, who, b"acct%04d" % i, t, network=network)
        assert (count.allowed, count.already_counted, count.counted) == (True, False, on_network), i
        assert await is_spilled(counters, key, who) == (i + 1 > scripts.SPILL)
        # ... this network's admitted within the crowd window (asked again
        # of an account counted already, which records nothing) ...
        again = await register(
            counters, key, who, b"acct%04d" % i, t, network=network, inputs=crowd
        )
        within = sum(
            1 for j in range(i + 1) if networks[j % 2] == network and t - j * 1000 - T0 < 50_000
        )
        assert (again.already_counted, again.counted, again.threshold) == (True, within, 1000)
        # ... and for a rare identity: this network's, and any admitted
        # within the rotation window.
        rare = await register(
            counters, key, who, b"acct%04d" % i, t, network=network, inputs=rotating
        )
        either = sum(
            1 for j in range(i + 1) if networks[j % 2] == network or t - j * 1000 - T0 < 30_000
        )
        assert rare.counted == either
    entries, farmed = await counters.entries(key, keys.field(who))
    assert sorted(e.member for e in entries) == [b"acct%04d" % i for i in range(total)]
    assert not farmed
    # Over the limit: refused, and the rare identity's refusal marks it farmed.
    refused = await register(
        counters, key, who, b"refused1", T0 + total * 1000, inputs=rotating, limit=3
    )
    assert (refused.allowed, refused.over, refused.scope) == (False, True, 1)
    assert (await counters.entries(key, keys.field(who)))[1]
    farmed_count = await register(
        counters, key, who, b"acct0000", T0 + total * 1000, inputs=rotating, limit=3
    )
    assert farmed_count.counted == total


async def test_a_spilled_identity_drops_expired_accounts_and_is_swept(
    counters: GuardCounters,
) -> None:
    key = bucket_key()
    who = identity()
    await login(counters, key, who, b"long-001", T0, life_ms=60_000)
    for i in range(scripts.SPILL + 6):
        await login(counters, key, who, b"acct%04d" % i, T0, life_ms=1000)
    assert await is_spilled(counters, key, who)
    spill, expiries, admissions = keys.spills(key, keys.field(who))
    # Later, the expired accounts are dropped as the identity is touched.
    later = await login(counters, key, who, b"later-01", T0 + 5000, life_ms=1000, limit=1000)
    assert (later.allowed, later.counted) == (True, 1)
    assert await counters._client.zcard(expiries) == 2
    assert await counters._client.zcard(admissions) == 2
    assert await counters._client.hlen(spill) == 2 + 2  # the accounts, 'a' and one 'n'
    entries, _ = await counters.entries(key, keys.field(who))
    assert sorted(e.member for e in entries) == [b"later-01", b"long-001"]
    # A removed account is the spill's too.
    assert await counters.remove(key, keys.field(who), b"later-01")
    assert not await counters.remove(key, keys.field(who), b"later-01")
    again = await login(counters, key, who, b"long-001", T0 + 6000, life_ms=1000)
    assert (again.already_counted, again.counted, again.expire_ms) == (True, 1, T0 + 60_000)
    # Long after, other identities' calls sweep its marker away, and the
    # identity counts from nothing again (its stale spill is rewritten
    # whole if it spills again).
    for _ in range(200):
        await login(counters, key, identity(), b"other001", T0 + 100_000, life_ms=60_000)
        if keys.field(who) not in await counters._client.hkeys(key):
            break
    assert keys.field(who) not in await counters._client.hkeys(key)
    fresh = await login(counters, key, who, b"acct0000", T0 + 110_000)
    assert (fresh.already_counted, fresh.counted) == (False, 0)
    for i in range(1, scripts.SPILL + 1):
        await login(counters, key, who, b"acct%04d" % i, T0 + 110_000)
    assert await is_spilled(counters, key, who)
    assert len((await counters.entries(key, keys.field(who)))[0]) == scripts.SPILL + 1
    assert await counters._client.hget(spill, "a") == b"%d" % (scripts.SPILL + 1)


async def test_a_spilled_identitys_keys_live_as_long_as_its_latest_account(
    counters: GuardCounters,
) -> None:
    key = bucket_key("register")
    who = identity()
    for i in range(scripts.SPILL + 1):
        await register(counters, key, who, b"acct%04d" % i, 0, life_ms=600_000)
    assert await is_spilled(counters, key, who)
    names = keys.spills(key, keys.field(who))
    for name in [key, *names]:
        assert 590_000 < await counters._client.pttl(name) <= 600_000
    # A shorter account never shortens them; one without a window makes
    # them persistent.
    await register(counters, key, who, b"short001", 0, life_ms=5000)
    for name in [key, *names]:
        assert await counters._client.pttl(name) > 590_000
    forever = await register(counters, key, who, b"forever1", 0)
    assert forever.expire_ms == FOREVER_MS
    for name in [key, *names]:
        assert await counters._client.pttl(name) == -1
    assert (await record_of(counters, key, who)).expire_ms == FOREVER_MS


async def test_a_spilled_login_renews_its_keys(counters: GuardCounters) -> None:
    key = bucket_key()
    who = identity()
    for i in range(scripts.SPILL + 1):
        await login(counters, key, who, b"acct%04d" % i, 0, life_ms=60_000)
    assert await is_spilled(counters, key, who)
    assert await counters.renew(key, keys.field(who), b"acct0003", 900_000) > 0
    for name in [key, *keys.spills(key, keys.field(who))]:
        assert await counters._client.pttl(name) > 800_000
    assert await counters.remove(key, keys.field(who), b"acct0003")
    assert await counters.renew(key, keys.field(who), b"acct0003", 900_000) == 0


async def test_a_spilled_identity_moves_whole_and_its_keys_go_with_it(
    counters: GuardCounters,
) -> None:
    key = bucket_key("register")
    who, into = identity(), identity()
    velocity = POPULAR._replace(velocity=(0, 0, 0, 1000))
    for i in range(scripts.SPILL + 10):
        await register(
            counters, key, who, b"acct%04d" % i, T0 + i, life_ms=600_000, inputs=velocity
        )
    entries, farmed = await counters.entries(key, keys.field(who))
    # A merge: the target gets every account (spilling too), the source goes.
    assert await counters.restore(
        key, keys.field(into), entries, farmed=farmed, now_ms=T0 + 100
    ) == len(entries)
    assert await is_spilled(counters, key, into)
    moved, _ = await counters.entries(key, keys.field(into))
    assert sorted(moved) == sorted(entries)
    # Restoring into a spilled identity adds only what it lacks.
    assert await counters.restore(key, keys.field(into), entries, now_ms=T0 + 100) == 0
    await counters.remove_fields([(key, keys.field(who))])
    for name in keys.spills(key, keys.field(who)):
        assert not await counters._client.exists(name)
    # The day's registration times moved too: the velocity window counts them.
    day = await register(
        counters, key, into, b"newacct1", T0 + 200, life_ms=600_000, inputs=velocity
    )
    assert (day.scope, day.counted) == (scripts_velocity_day(), scripts.SPILL + 10)


def scripts_velocity_day() -> int:
    # The day window's scope (counters.Scope.VELOCITY + 3).
    return 6


@pytest.mark.parametrize("accounts", [3, scripts.SPILL + 1], ids=["packed", "spilled"])
async def test_a_farmed_mark_counts_every_network_unless_the_fingerprint_is_shared(
    counters: GuardCounters, accounts: int
) -> None:
    key = bucket_key("register")
    who = identity()
    rotating = RARE._replace(rotation_ms=30_000)
    for i in range(accounts):
        assert (await register(counters, key, who, b"acct%04d" % i, T0, inputs=rotating)).allowed
    assert await is_spilled(counters, key, who) == (accounts > scripts.SPILL)
    refused = await register(counters, key, who, b"refused1", T0 + 1000, inputs=rotating, limit=3)
    assert (refused.allowed, refused.scope) == (False, 1)
    assert (await counters.entries(key, keys.field(who)))[1]  # farmed
    later = T0 + 60_000  # past the rotation window, from another network
    # A rare fingerprint: the mark makes every network count.
    marked = await register(
        counters, key, who, b"stranger", later, inputs=rotating, limit=3, network=OTHER_NETWORK
    )
    assert (marked.allowed, marked.counted, marked.scope) == (False, accounts, 1)
    # One strangers share: only this network's accounts and the rotation window's.
    shared = await register(
        counters,
        key,
        who,
        b"stranger",
        later,
        inputs=rotating._replace(sharers=1.0),
        limit=3,
        network=OTHER_NETWORK,
    )
    assert (shared.allowed, shared.counted) == (True, 0)
    # On the farm's own network they all count still (and the stranger,
    # admitted within the rotation window).
    home = await register(
        counters, key, who, b"another1", later, inputs=rotating._replace(sharers=1.0), limit=3
    )
    assert (home.allowed, home.counted) == (False, accounts + 1)


@pytest.mark.parametrize("accounts", [3, scripts.SPILL + 1], ids=["packed", "spilled"])
async def test_in_a_farmed_identitys_burst_every_network_counts(
    counters: GuardCounters, accounts: int
) -> None:
    key = bucket_key("register")
    farm, stranger = identity(), identity()
    # The day's registration times are kept (a velocity window is on).
    timed = RARE._replace(velocity=(0, 0, 0, 10_000))
    for who in (farm, stranger):
        for i in range(accounts):
            assert (await register(counters, key, who, b"acct%04d" % i, T0, inputs=timed)).allowed
    refused = await register(counters, key, farm, b"refused1", T0 + 1000, inputs=timed, limit=3)
    assert (refused.allowed, refused.scope) == (False, 1)
    assert (await counters.entries(key, keys.field(farm)))[1]  # farmed
    # An hour on, both popular now (each network counts apart), each from a
    # new network: a first account is allowed; a second within 10 minutes
    # is the farm's burst, where every network's accounts count.
    popular = POPULAR._replace(velocity=(0, 0, 0, 10_000), farm_burst=1)
    later = T0 + 3_600_000
    for who in (farm, stranger):
        first = await register(
            counters, key, who, b"later001", later, inputs=popular, limit=3, network=OTHER_NETWORK
        )
        assert first.allowed
    burst = await register(
        counters, key, farm, b"later002", later + 300_000, inputs=popular, limit=3,
        network=THIRD_NETWORK,
    )  # fmt: skip
    assert (burst.allowed, burst.scope, burst.counted, burst.threshold) == (
        False, 7, accounts + 1, 3,
    )  # fmt: skip
    # Not without the rule, nor for an identity never refused.
    for who, inputs in ((farm, popular._replace(farm_burst=0)), (stranger, popular)):
        second = await register(
            counters, key, who, b"later002", later + 300_000, inputs=inputs, limit=3,
            network=THIRD_NETWORK,
        )  # fmt: skip
        assert second.allowed and second.scope != 7, who


async def test_a_farmed_identitys_burst_counts_only_the_windows_live_accounts(
    counters: GuardCounters,
) -> None:
    # A policy with a window: the farm's accounts of yesterday are gone,
    # and so is what its burst would count.
    key = bucket_key("register")
    farm = identity()
    day = 86_400_000
    timed = RARE._replace(velocity=(0, 0, 0, 10_000), farm_burst=1)
    for i in range(3):
        assert (
            await register(counters, key, farm, b"acct%04d" % i, T0, inputs=timed, life_ms=day)
        ).allowed
    refused = await register(
        counters, key, farm, b"refused1", T0 + 1000, inputs=timed, limit=3, life_ms=day
    )
    assert (refused.allowed, refused.scope) == (False, 1)
    popular = POPULAR._replace(velocity=(0, 0, 0, 10_000), farm_burst=1)
    # The farmed record outlives the day by one account admitted late (a
    # minute before the next: each of those is in the farm's burst).
    late = await register(
        counters, key, farm, b"late0001", T0 + day - 1000, inputs=popular, limit=3, life_ms=day,
        network="8899aabbccddeeff",
    )  # fmt: skip
    assert late.allowed
    for i, network in enumerate((OTHER_NETWORK, THIRD_NETWORK)):
        again = await register(
            counters, key, farm, b"next%04d" % i, T0 + day + 60_000 * (i + 1), inputs=popular,
            limit=3, life_ms=day, network=network,
        )  # fmt: skip
        assert again.allowed, i
    third = await register(
        counters, key, farm, b"next0002", T0 + day + 180_000, inputs=popular, limit=3,
        life_ms=day, network="0011223344556677",
    )  # fmt: skip
    assert (third.allowed, third.scope, third.counted) == (False, 7, 3)
