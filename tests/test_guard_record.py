"""The guard's SQL record, on PostgreSQL and SQLite: what each call leaves
in guard_entries, guard_links, guard_fingerprints, guard_fingerprint_links,
guard_sightings and guard_farmed."""

from __future__ import annotations

import math
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import RunningServer
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import convert, identity_record, rules
from tether.server.guard.fingerprint import Fingerprint, fingerprint_of
from tether.server.guard.identities import MIN_POPULATION, IdentityBook, rate_per_hour
from tether.server.guard.recorder import Change
from tether.server.guard.tables import (
    GuardEntry,
    GuardFarmed,
    GuardFingerprint,
    GuardLink,
    GuardLinkRecord,
    GuardSighting,
)
from tether.server.shared.digests import Digester, DigestKey


def home() -> str:
    return f"10.220.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


async def _rows(server: RunningServer, table: Any, *where: Any) -> list[Any]:
    async with server.app.runtime.db.sessions() as session:
        return list((await session.scalars(select(table).where(*where))).all())


async def test_a_registration_is_in_sql_before_it_is_allowed(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    verdict = await guard.evaluate(
        service, "register", account("r1"), fingerprint(secrets.token_hex(4)), home()
    )
    assert verdict.verdict == pb.VERDICT_ALLOW
    # No flush: the caller hears "allow" only once the entry is committed.
    [entry] = await _rows(any_server, GuardEntry, GuardEntry.service_id == service)
    assert (entry.action, entry.room_id, entry.identity, entry.expire_time) == (
        "register",
        "",
        verdict.explanation.fingerprint,
        None,
    )
    assert len(entry.network) == 16
    assert entry.network != home()


async def test_log_ins_joins_links_and_what_the_book_learned_are_written_behind(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=5, collaborate_limit=5)
    network = home()
    seed = secrets.token_hex(4)
    base, resized = fingerprint(seed), fingerprint(seed, screen_width=1280)
    a = await guard.evaluate(service, "login", account("a"), base, network)
    b = await guard.evaluate(service, "login", account("b"), resized, network)
    c = await guard.evaluate(service, "collaborate", account("c"), base, network, room_id="room-1")
    assert b.identity == a.identity == c.identity
    assert await guard.end_login(service, a.identity, account("a"))
    await guard_of(any_server).recorder.flush()

    entries = await _rows(any_server, GuardEntry, GuardEntry.service_id == service)
    assert {(e.action, e.room_id, e.identity): e.expire_time for e in entries} == {
        ("login", "", b.explanation.fingerprint): b.expire_time.ToDatetime(tzinfo=UTC),
        ("collaborate", "room-1", a.explanation.fingerprint): c.expire_time.ToDatetime(tzinfo=UTC),
    }
    links = await _rows(any_server, GuardLink, GuardLink.service_id == service)
    assert {(link.identity, link.last_action) for link in links} == {
        (a.identity, "login"),
        (a.identity, "collaborate"),
    }
    mine = [a.explanation.fingerprint, b.explanation.fingerprint]
    fingerprints = {
        f.fingerprint: f
        for f in await _rows(any_server, GuardFingerprint, GuardFingerprint.fingerprint.in_(mine))
    }
    assert set(fingerprints) == set(mine)
    stored = fingerprints[mine[0]].digests
    assert set(stored) == {"groups", "fonts", "version", "os_version"}
    assert len(stored["groups"]) == 5
    [record] = await _rows(
        any_server, GuardLinkRecord, GuardLinkRecord.source == b.explanation.fingerprint
    )
    assert (record.kind, record.target, record.changed) == (
        "drift_same_network",
        a.identity,
        ["screen"],
    )
    assert a.identity == a.explanation.fingerprint
    hour = math.floor(time.time() / 3600)
    sightings = await _rows(any_server, GuardSighting, GuardSighting.fingerprint.in_(mine))
    assert {s.fingerprint for s in sightings} == set(mine)
    assert {s.hour for s in sightings} <= {hour, hour - 1}
    assert len({s.network for s in sightings}) == 1


async def test_a_refusal_as_one_browser_is_recorded_as_farmed(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=1)
    browser, network = fingerprint(secrets.token_hex(4)), home()
    first = await guard.evaluate(service, "register", account("f1"), browser, network)
    refused = await guard.evaluate(service, "register", account("f2"), browser, network)
    assert refused.verdict == pb.VERDICT_DENY
    assert refused.explanation.scope == pb.SCOPE_BROWSER
    await guard_of(any_server).recorder.flush()
    [farmed] = await _rows(any_server, GuardFarmed, GuardFarmed.service_id == service)
    assert (farmed.action, farmed.identity) == ("register", first.identity)


async def test_a_restart_after_a_quiet_week_does_not_make_the_book_fresh(
    any_server: RunningServer,
) -> None:
    """In its first day the book counts a fingerprint strangers share on its
    network alone (rules.inputs). A restart restores the sightings of the
    last 7 days only: after a quiet week, a book that has run for weeks
    would find only today's and take itself for a new one, loosening that
    count. Its age comes from the record's fingerprints (30 days) too."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    verdict = await guard.evaluate(
        service, "register", account("q1"), fingerprint(secrets.token_hex(4)), home()
    )
    name = verdict.explanation.fingerprint
    week_ago = datetime.now(UTC) - timedelta(days=8)
    db = any_server.app.runtime.db
    async with db.transaction() as session:
        # First seen a week ago; its sightings of then are gone (horizon).
        await session.execute(
            update(GuardFingerprint)
            .where(GuardFingerprint.fingerprint == name)
            .values(first_seen_time=week_ago)
        )
    now = time.time()
    restored = IdentityBook()
    await identity_record.load(db, restored, now)
    assert now - restored.watched_since < 24 * 3600
    assert restored.known_since <= week_ago.timestamp()
    inputs = rules.inputs(
        restored, restored.find(name), "n", now, 3, fingerprint=name, velocity=True
    )
    assert inputs.book_age_hours >= 8 * 24
    assert not inputs.fresh_book


def _digested(digester: Digester, message: pb.FingerprintComponents) -> Fingerprint:
    components = convert.components(message, True)
    assert components is not None
    return fingerprint_of(digester, components)


async def test_a_restart_three_weeks_on_still_knows_a_farms_home_network(
    any_server: RunningServer,
) -> None:
    """A farm back on its own network with nothing of its set-up left to
    match is found through the last fingerprints seen there
    (IdentityBook.farm_return_candidates). Sightings are kept for a week
    only, so each fingerprint's row keeps the network it was last seen on:
    a restart three weeks on still names the farm."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    seed, ip = secrets.token_hex(4), home()
    farm = await guard.evaluate(service, "register", account("h1"), fingerprint(seed), ip)
    live = guard_of(any_server)
    await live.recorder.flush()
    later = time.time() + 21 * 24 * 3600
    restored = IdentityBook()
    await identity_record.load(any_server.app.runtime.db, restored, later)
    digester = live.validator.digester
    # Strangers on other devices and networks: enough for the book to
    # know what is rare, whatever else the record holds.
    for i in range(MIN_POPULATION):
        stranger = fingerprint(f"{seed}-{i}", os_name="Windows", platform="Win32")
        restored.resolve(_digested(digester, stranger), f"n{i}", later)
    back = fingerprint(
        seed,
        browser_version="133.0.6900.1",
        screen_width=1600,
        screen_height=900,
        languages=["pt-BR", "pt"],
        fonts=["Ubuntu", "Noto Sans", f"Other {seed}"],
    )
    fp = _digested(digester, back)
    network = live.validator.network(ip)
    resolution = restored.resolve(fp, network, later + 60)
    assert resolution.identity != farm.identity
    candidates = restored.farm_return_candidates(fp, resolution.identity, network, later + 60)
    assert farm.identity in candidates


async def test_a_follower_takes_a_link_whose_fingerprint_committed_late(
    any_server: RunningServer,
) -> None:
    # Another process's book reads the record while a drift's fingerprint
    # and link commit. The two reads need not see the same commits, and a
    # late commit falls behind the time watermark: the link must bring its
    # fingerprint along, or the drift stays a stranger in that book forever.
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    network, seed = home(), secrets.token_hex(4)
    base = await guard.evaluate(service, "register", account("l1"), fingerprint(seed), network)
    db = any_server.app.runtime.db
    book = IdentityBook()
    _, marks = await identity_record.load(db, book, time.time())
    assert book.knows(base.explanation.fingerprint)
    # Rows newer than this were already read: the drift's row is "late".
    marks.fingerprints = datetime.now(UTC) + timedelta(hours=1)
    drift = fingerprint(seed, screen_width=1280)
    drifted = await guard.evaluate(service, "register", account("l2"), drift, network)
    assert drifted.identity == base.identity
    assert await identity_record.follow(db, book, marks, time.time()) >= 1
    assert book.find(drifted.explanation.fingerprint) == book.find(base.explanation.fingerprint)


async def test_a_sweep_takes_a_new_browser_whose_row_committed_late(
    any_server: RunningServer,
) -> None:
    # A first visit links nothing: only its row tells the other books. If
    # its writer stalled past the follow's overlap, the minutely sweep
    # still brings it, and its drifts can link to it there.
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    db = any_server.app.runtime.db
    book = IdentityBook()
    _, marks = await identity_record.load(db, book, time.time())
    verdict = await guard.evaluate(
        service, "register", account("s1"), fingerprint(secrets.token_hex(4)), home()
    )
    # Rows up to a few seconds newer were already read.
    marks.fingerprints = datetime.now(UTC) + timedelta(seconds=5)
    await identity_record.follow(db, book, marks, time.time())
    assert not book.knows(verdict.identity)
    await identity_record.follow(
        db, book, marks, time.time(), look_back=identity_record.SWEEP_OVERLAP
    )
    assert book.knows(verdict.identity)


def test_sightings_are_recorded_once_an_hour_per_network() -> None:
    sightings = identity_record.Sightings()
    assert sightings.new("f", "n", 3600.0) == ("f", "n", 1, 0)
    assert sightings.new("f", "n", 3700.0) is None
    assert sightings.new("f", "m", 3700.0) == ("f", "m", 1, 1)
    assert sightings.new("f", "n", 7201.0 + 25 * 60) == ("f", "n", 2, 25)


def test_a_restart_keeps_the_count_of_a_fingerprint_busier_than_its_slots() -> None:
    """A phone model seen 200 times an hour for 8 hours, each time on a
    network of its own, fills every 10-minute slot: its rate comes from
    counting those sightings. A restart rebuilds the book from the record
    (the rows identity_record.Sightings keeps: one per network and hour) and
    must count them again, or velocity would judge the phone's owners
    against the slots' ceiling, about 17 an hour, after every restart; and
    it must not count more than the book did live."""
    digester = Digester([DigestKey("k1", bytes(range(32)))])
    components = convert.components(fingerprint("busy"), present=True)
    assert components is not None
    phone = fingerprint_of(digester, components)
    start = 1_790_812_800.0
    live = IdentityBook()
    sightings = identity_record.Sightings()
    rows = []
    for i in range(1600):
        t, network = start + i * 18.0, f"network-{i}"
        live.resolve(phone, network, t)
        if (row := sightings.new(phone.identity, network, t)) is not None:
            rows.append(row)
    now = start + 8 * 3600.0

    restored = IdentityBook()
    restored.restore_fingerprint(phone, start, now, "")
    for name, network, hour, minute in rows:
        restored.restore_sighting(name, network, identity_record.sighting_time(hour, minute))
    # Seven hours of sightings before the last, with a day of "not seen"
    # shared among its 80-minute chunks: 156 an hour. Its full slots alone
    # said 16.
    assert (
        100
        < rate_per_hour(restored, phone.identity, now)
        <= rate_per_hour(live, phone.identity, now)
    )


async def test_a_restart_rebuilds_an_identitys_rate_in_the_slots_it_was_seen_in(
    any_server: RunningServer,
) -> None:
    """The book counts an identity's rate in 10-minute slots, and velocity
    judges bursts against it: a fingerprint seen from twelve networks over
    two hours, ten minutes apart, must come back from the record in twelve
    slots, not in the two its hours would give (the rate then fell to a
    sixth, and velocity refused what it allowed before the restart)."""
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=5)
    verdict = await guard.evaluate(
        service, "login", account("r1"), fingerprint(secrets.token_hex(4)), home()
    )
    name = verdict.explanation.fingerprint
    now = time.time()
    first_hour = math.floor(now / 3600) - 4
    seen = [(f"10.221.{i}.1", first_hour * 3600 + i * 600 + 90.0) for i in range(12)]
    change = Change()
    for network, t in seen:
        change.sightings.add((name, network, math.floor(t / 3600), math.floor(t % 3600 / 60)))
    recorder = guard_of(any_server).recorder
    recorder.later(change)
    await recorder.flush()

    db = any_server.app.runtime.db
    restored = IdentityBook()
    await identity_record.load(db, restored, now)
    # What a book that saw them live holds: each sighting at its own time.
    [row] = await _rows(any_server, GuardFingerprint, GuardFingerprint.fingerprint == name)
    live = IdentityBook()
    live.restore_fingerprint(
        identity_record.fingerprint_from(name, row.digests),
        row.first_seen_time.timestamp(),
        row.last_seen_time.timestamp(),
        "",
    )
    for network, t in seen:
        live.restore_sighting(name, network, t)
    [own] = await _rows(
        any_server,
        GuardSighting,
        GuardSighting.fingerprint == name,
        GuardSighting.hour > first_hour + 2,
    )
    live.restore_sighting(name, own.network, identity_record.sighting_time(own.hour, own.minute))
    assert rate_per_hour(restored, name, now) == rate_per_hour(live, name, now) > 0
