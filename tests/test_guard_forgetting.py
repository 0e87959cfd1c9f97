"""The identity book forgets fingerprints not seen for FORGET_AFTER, so its
memory follows the browsers of the last weeks, not every browser ever; a
forgotten fingerprint that comes back counts against the identity it had."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
import pytest

from tests.guard_support import (
    fingerprint,
    guard_client,
    guard_of,
    new_service,
    replay_verdicts,
    timed_event,
)
from tests.support import RunningServer, start_server
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import identity_record
from tether.server.guard.convert import components as components_of
from tether.server.guard.fingerprint import fingerprint_of
from tether.server.guard.identities import FORGET_AFTER, IdentityBook
from tether.server.shared.digests import Digester, DigestKey

DAY = 86_400.0
T0 = 1_790_000_000.0


async def test_a_forgotten_browser_comes_back_to_its_identity_and_its_count(
    any_server: RunningServer,
) -> None:
    """A backtest's timeline: a browser and its drift, then a month of
    silence; the book lets both go (a later drift no longer links to them),
    and the drift, back home, still counts against their identity."""
    guard = await guard_client(any_server)
    seed, home = secrets.token_hex(4), "10.230.0.1"
    drifted = fingerprint(seed, screen_width=1280, screen_height=800)
    later = T0 + FORGET_AFTER + DAY
    verdicts = await replay_verdicts(
        guard,
        2,
        [
            timed_event(T0, "f1", fingerprint(seed), home),
            timed_event(T0 + 60, "f2", drifted, home),
            # A new browser: the book looks at those it held longest.
            timed_event(later, "n1", fingerprint(secrets.token_hex(4)), "10.230.9.1"),
            # Another drift of the first, at home: nothing held to link to.
            timed_event(later + 60, "f3", fingerprint(seed, languages=["pt-BR"]), home),
            timed_event(later + 120, "f4", drifted, home),
            # The first itself: kept by name only (it had no link), it is
            # its own identity again, not a new fingerprint to link.
            timed_event(later + 180, "f5", fingerprint(seed), home),
        ],
    )
    first, second, _, other, back, itself = verdicts
    assert second.identity == first.identity
    assert second.explanation.links[0].kind == pb.LINK_KIND_DRIFT_SAME_NETWORK
    assert other.identity != first.identity
    assert other.verdict == pb.VERDICT_ALLOW and other.count == 1
    assert back.identity == first.identity
    assert back.verdict == pb.VERDICT_DENY
    assert back.explanation.scope == pb.SCOPE_BROWSER
    assert back.count == 2
    assert back.explanation.links[0].kind == pb.LINK_KIND_DRIFT_SAME_NETWORK
    assert itself.identity == first.identity
    assert itself.explanation.fingerprint == first.explanation.fingerprint
    assert not itself.explanation.links
    assert itself.verdict == pb.VERDICT_DENY and itself.count == 2


async def _later_drift_joins(server: RunningServer, days: float) -> bool:
    """Whether a browser's drift `days` after it was last seen, at home,
    still joins its identity (after a new browser came in between)."""
    guard = await guard_client(server)
    seed, home = secrets.token_hex(4), "10.232.0.1"
    later = T0 + days * DAY
    first, _, other = await replay_verdicts(
        guard,
        3,
        [
            timed_event(T0, "s1", fingerprint(seed), home),
            timed_event(later, "s2", fingerprint(secrets.token_hex(4)), "10.232.9.1"),
            timed_event(later + 60, "s3", fingerprint(seed, languages=["pt-BR"]), home),
        ],
    )
    return other.identity == first.identity


async def test_how_long_the_book_holds_a_browser_is_a_setting(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert await _later_drift_joins(pg_server, 11)
    shorter = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        http_listen="",
        guard_forget_after_days=10,
    )
    try:
        assert not await _later_drift_joins(shorter, 11)
        assert await _later_drift_joins(shorter, 9)
    finally:
        await shorter.stop()


async def test_a_restart_a_month_later_holds_only_the_names_of_old_browsers(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    seed, home = secrets.token_hex(4), "10.231.0.1"
    first = await guard.evaluate(service, "register", account("r1"), fingerprint(seed), home)
    drifted = fingerprint(seed, screen_width=1280, screen_height=800)
    second = await guard.evaluate(service, "register", account("r2"), drifted, home)
    assert second.identity == first.identity
    names = (first.explanation.fingerprint, second.explanation.fingerprint)
    await guard_of(any_server).recorder.flush()
    db = any_server.app.runtime.db
    now = IdentityBook()
    await identity_record.load(db, now, time.time())
    assert all(now.holds(name) for name in names)
    later = IdentityBook()
    await identity_record.load(db, later, time.time() + FORGET_AFTER + DAY)
    for name in names:
        assert later.knows(name) and not later.holds(name)
        assert later.find(name) == first.identity
    assert later.link_of(names[1]) == now.link_of(names[1])
    assert later.size() < now.size()


async def test_a_browser_forgotten_by_name_only_is_still_known_to_operators_and_counts(
    any_server: RunningServer,
) -> None:
    """The live book forgets a browser that never linked: it keeps its name
    only. An operator still finds it (its times read from SQL), a name never
    seen is still NOT_FOUND, and the browser, back, counts as before."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=1)
    seed, home = secrets.token_hex(4), "10.233.0.1"
    first = await guard.evaluate(service, "register", account("g1"), fingerprint(seed), home)
    name = first.explanation.fingerprint
    live = guard_of(any_server)
    await live.recorder.flush()
    book = live.book
    book._forget(book._known[name], time.time())
    assert book.knows(name) and not book.holds(name) and not book.surely_knows(name)
    view = await guard.explain_identity(name)
    assert [f.fingerprint for f in view.fingerprints] == [name]
    assert view.fingerprints[0].first_seen_time.seconds > 0
    never = secrets.token_hex(16)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await guard.unlink(never, "never seen")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    back = await guard.evaluate(service, "register", account("g2"), fingerprint(seed), home)
    assert back.identity == first.identity and not back.explanation.links
    assert back.verdict == pb.VERDICT_DENY
    assert book.holds(name)


def test_the_book_holds_the_browsers_of_the_last_weeks() -> None:
    """90 days of new browsers, 200 a day: the book holds about those of
    FORGET_AFTER (plus the few days it takes to look at each once more)."""
    digester = Digester([DigestKey("k1", secrets.token_bytes(32))])
    book = IdentityBook()
    per_day, days = 200, 90
    for day in range(days):
        for i in range(per_day):
            components = components_of(fingerprint(f"{day}-{i}"), True)
            assert components is not None
            fp = fingerprint_of(digester, components)
            t = T0 + day * DAY + i * DAY / per_day
            book.resolve(fp, f"net-{day}-{i}", t)
    held_days = FORGET_AFTER / DAY
    assert book.size() <= per_day * held_days * 1.3
    assert book.size() >= per_day * held_days
    # Every browser is held or forgotten. A name the filter of forgotten
    # names already takes for one of them when it is forgotten (at most
    # once in 10^6 lookups, forgotten.FALSE_POSITIVES: over this test's
    # 11,000 or so, about one run in a hundred) is not counted again.
    assert per_day * days - 1 <= book.size() + book.forgotten() <= per_day * days
    # None of them linked: the book kept their names only, in a few bytes
    # each (filters grown ahead of need at most double the ~4 a name takes;
    # a name with its times took about 250).
    assert not book._forgotten
    assert book.forgotten_bytes() < 16 * book.forgotten()
    assert not book.knows("0" * 32)
    # Shares are among the fingerprints held, as a restart restores them.
    assert book._values.total == book.size()
    # Every browser here started an identity: those held still count as such.
    assert book._started_identities == book.size()
