"""The guard's SQL record (guard/recorder.py), on PostgreSQL and SQLite:
what each call leaves in guard_entries, guard_links and guard_identities."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import select

from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import RunningServer
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import convert
from tether.server.guard.identity import sketch
from tether.server.guard.tables import GuardEntry, GuardIdentity, GuardLink

IP = "198.51.100.7"


Entries = dict[tuple[str, str, str, bytes], datetime | None]


async def _entries(server: RunningServer, service: str) -> Entries:
    """(action, room, identity, account member) -> the entry's expiry."""
    async with server.app.runtime.db.sessions() as session:
        rows = (
            await session.scalars(select(GuardEntry).where(GuardEntry.service_id == service))
        ).all()
    return {(r.action, r.room_id, r.identity, r.member): r.expire_time for r in rows}


async def _links(server: RunningServer, service: str) -> dict[tuple[str, bytes], GuardLink]:
    async with server.app.runtime.db.sessions() as session:
        rows = (
            await session.scalars(select(GuardLink).where(GuardLink.service_id == service))
        ).all()
    return {(r.identity, r.account_digest): r for r in rows}


async def _identity(server: RunningServer, identity: str) -> GuardIdentity | None:
    async with server.app.runtime.db.sessions() as session:
        return await session.get(GuardIdentity, identity)


def _expected_sketch(server: RunningServer, browser: pb.FingerprintComponents) -> dict[str, str]:
    digester = server.app.runtime.digester
    value = convert.components(browser, True)
    assert value is not None
    return {
        **sketch(digester, value),
        "ip_prefix": digester.digest("guard-component", "ip_prefix=198.51.100.0/24")[:8].hex(),
    }


async def test_a_registration_is_in_sql_before_it_is_allowed(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    browser = fingerprint(secrets.token_hex(4))
    verdict = await guard.evaluate(service, "register", account("r1"), browser, IP)
    assert verdict.verdict == pb.VERDICT_ALLOW
    # No flush: the caller hears "allow" only once the entry is committed.
    entries = await _entries(any_server, service)
    assert [(k[:3], v) for k, v in entries.items()] == [(("register", "", verdict.identity), None)]


async def test_log_ins_joins_and_log_outs_are_written_behind_with_links_and_sketches(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=5, collaborate_limit=5)
    # Browsers of this test only: identities (and their links) span services.
    home, other = fingerprint(secrets.token_hex(4)), fingerprint(secrets.token_hex(4))
    a = await guard.evaluate(service, "login", account("a"), home, IP)
    b = await guard.evaluate(service, "login", account("b"), home, IP)
    c = await guard.evaluate(service, "collaborate", account("c"), other, IP, room_id="room-1")
    assert await guard.end_login(service, a.identity, account("a"))
    recorder = guard_of(any_server).recorder
    await recorder.flush()

    entries = await _entries(any_server, service)
    assert {k[:3]: v for k, v in entries.items()} == {
        ("login", "", b.identity): b.expire_time.ToDatetime(tzinfo=UTC),
        ("collaborate", "room-1", c.identity): c.expire_time.ToDatetime(tzinfo=UTC),
    }
    links = await _links(any_server, service)
    assert {(i, link.last_action) for (i, _), link in links.items()} == {
        (a.identity, "login"),
        (c.identity, "collaborate"),
    }
    assert len(links) == 3
    members = {k[3] for k in entries}
    assert members <= {digest[:8] for _, digest in links}
    for link in links.values():
        assert link.first_seen_time <= link.last_seen_time
    for verdict, browser in ((a, home), (c, other)):
        stored = await _identity(any_server, verdict.identity)
        assert stored is not None
        assert stored.sketch == _expected_sketch(any_server, browser)

    # A new entry on known keys: the link and the identity keep their first
    # sighting and move their last one.
    [(a_key, first_link)] = [
        (k, link)
        for k, link in links.items()
        if link.identity == a.identity and k[1][:8] not in members
    ]
    first_identity = await _identity(any_server, a.identity)
    assert first_identity is not None
    again = await guard.evaluate(service, "login", account("a"), home, IP)
    assert again.reason == pb.VERDICT_REASON_WITHIN_LIMIT
    await recorder.flush()
    relinked = (await _links(any_server, service))[a_key]
    assert relinked.first_seen_time == first_link.first_seen_time
    assert relinked.last_seen_time > first_link.last_seen_time
    identity_row = await _identity(any_server, a.identity)
    assert identity_row is not None
    assert identity_row.first_seen_time == first_identity.first_seen_time
    assert identity_row.last_seen_time > first_identity.last_seen_time
    assert len(await _entries(any_server, service)) == 3
