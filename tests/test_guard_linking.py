"""The identity behind a fingerprint, through gRPC: which fingerprints are
one browser, which are many people, and how each verdict explains itself.

Every test uses browsers and networks of its own: the identity book is the
server's, shared by every service and test, and what one test teaches it
(how popular a fingerprint is, how crowded a network) would steer another.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from pathlib import Path

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
from tether.clients.guard.client import GuardClient, account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import identity_record
from tether.server.guard.identities import MIN_POPULATION, IdentityBook


def fresh_network() -> str:
    """An IPv4 address no other test uses (a home of its own)."""
    return (
        f"10.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    )


def browser(**changes: object) -> pb.FingerprintComponents:
    """A browser nobody else in the suite has: its own fonts."""
    return fingerprint(secrets.token_hex(4), **changes)


def desktop(seed: str, **changes: object) -> pb.FingerprintComponents:
    """A desktop browser with a realistic font list (dozens of fonts), its
    own by seed."""
    fields: dict[str, object] = {"fonts": [f"Font {seed} {i}" for i in range(30)]}
    fields.update(changes)
    return fingerprint(seed, **fields)


def iphone(seed: str, **changes: object) -> dict[str, object]:
    """An iPhone's Safari set-up (a font of its own by seed), as keywords
    for fingerprint()."""
    return {
        "browser_name": "Safari",
        "os_name": "iOS",
        "platform": "iPhone",
        "fonts": ["Helvetica Neue", "Hiragino Sans", f"Font {seed}"],
        "plugins": [],
        **changes,
    }


def signal(verdict: pb.EvaluateResponse, name: str) -> pb.Signal:
    [found] = [s for s in verdict.explanation.signals if s.name == name]
    return found


def kinds(verdict: pb.EvaluateResponse) -> list[int]:
    return [link.kind for link in verdict.explanation.links]


async def test_a_drifting_browser_on_its_home_network_stays_one_identity(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    home = fresh_network()
    seed = secrets.token_hex(4)
    first = await guard.evaluate(service, "register", account("d0"), desktop(seed), home)
    assert first.explanation.fingerprint == first.identity
    assert not first.explanation.links
    # An update, a resized window, another language, a font installed.
    fonts = [f"Font {seed} {i}" for i in range(30)]
    drifted = [
        desktop(seed, browser_version="131.0.6778.140"),
        desktop(seed, screen_width=1600, screen_height=900),
        desktop(seed, languages=["fr-FR", "fr"]),
        desktop(seed, fonts=[*fonts, "Noto Sans Mono"]),
    ]
    verdicts = [first]
    for i, variant in enumerate(drifted):
        verdict = await guard.evaluate(service, "register", account(f"d{i + 1}"), variant, home)
        verdicts.append(verdict)
        assert verdict.identity == first.identity, (first.explanation, verdict.explanation)
        assert verdict.explanation.fingerprint != first.identity
        [link] = verdict.explanation.links
        assert link.kind == pb.LINK_KIND_DRIFT_SAME_NETWORK
        assert getattr(link, "from") == verdict.explanation.fingerprint
        assert link.to == first.identity
        assert 0.9 < link.confidence <= 1
        assert len(link.changed) == 1
        assert signal(verdict, "link_confidence").value == pytest.approx(link.confidence, abs=1e-4)
    # One browser, however it drifted: three accounts, then refusals.
    assert [v.verdict for v in verdicts] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 2


async def test_a_phone_with_a_few_fonts_changed_stays_one_identity(
    any_server: RunningServer,
) -> None:
    """A phone has few fonts: three changed (an anti-detect browser's noise)
    are a third of its set, yet still a few fonts; most of its set changed
    is another browser."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    home = fresh_network()
    seed = secrets.token_hex(4)
    fonts = [f"Phone {seed} {i}" for i in range(9)]
    first = await guard.evaluate(
        service, "register", account("p0"), fingerprint(seed, fonts=fonts), home
    )
    noisy = [*fonts[1:], "Noise A", "Noise B"]
    drifted = await guard.evaluate(
        service, "register", account("p1"), fingerprint(seed, fonts=noisy), home
    )
    assert drifted.identity == first.identity, drifted.explanation
    [link] = drifted.explanation.links
    assert link.kind == pb.LINK_KIND_DRIFT_SAME_NETWORK
    assert list(link.changed) == ["software"]
    other = [*fonts[:4], "Other A", "Other B", "Other C", "Other D", "Other E"]
    stranger = await guard.evaluate(
        service, "register", account("p2"), fingerprint(seed, fonts=other), home
    )
    assert stranger.identity not in (first.identity, drifted.explanation.fingerprint)


async def test_an_update_that_re_renders_counts_as_one_change(any_server: RunningServer) -> None:
    """A major update changes the version and the rendering readouts (the
    software group) at once: with a resized window, still one browser."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    home = fresh_network()
    seed = secrets.token_hex(4)
    first = await guard.evaluate(service, "register", account("u0"), desktop(seed), home)
    updated = desktop(
        seed,
        browser_version="132.0.6834.83",
        extra={"canvas": f"c-{seed}-132"},
        screen_width=1600,
        screen_height=900,
    )
    later = await guard.evaluate(service, "register", account("u1"), updated, home)
    assert later.identity == first.identity, later.explanation
    [link] = later.explanation.links
    assert link.kind == pb.LINK_KIND_DRIFT_SAME_NETWORK
    assert list(link.changed) == ["version", "screen", "software"]
    # Not so with the language changed too: four groups.
    relocated = desktop(
        seed,
        browser_version="133.0.6943.53",
        extra={"canvas": f"c-{seed}-133"},
        screen_width=1280,
        screen_height=720,
        languages=["pt-BR"],
    )
    other = await guard.evaluate(service, "register", account("u2"), relocated, home)
    assert pb.LINK_KIND_DRIFT_SAME_NETWORK not in kinds(other)


async def test_a_version_moving_back_is_not_the_same_browser(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    home = fresh_network()
    seed = secrets.token_hex(4)
    newer = await guard.evaluate(
        service, "register", account("v1"), fingerprint(seed, browser_version="132.0"), home
    )
    older = await guard.evaluate(
        service, "register", account("v2"), fingerprint(seed, browser_version="131.0"), home
    )
    assert older.identity != newer.identity


def _background(count: int, start: float) -> list[pb.BacktestEvent]:
    """A day of other people: what tells the book which values are common
    (the same day in every run)."""
    rng = random.Random(count)
    vocabulary = [f"Common Font {i}" for i in range(80)]
    sizes = [(1920, 1080), (1366, 768), (1536, 864), (1440, 900), (2560, 1440)]
    tongues = [["en-US", "en"], ["de-DE", "de"], ["fr-FR"], ["es-ES"], ["it-IT"]]
    events = []
    for i in range(count):
        w, h = rng.choice(sizes)
        person = fingerprint(
            f"bg{i}",
            fonts=rng.sample(vocabulary, 40),
            screen_width=w,
            screen_height=h,
            languages=rng.choice(tongues),
            browser_version=f"131.0.{rng.randrange(20)}",
        )
        events.append(
            timed_event(start + i * 50, f"bg{i}", person, f"10.4.{i % 250}.{1 + i // 250}")
        )
    return events


async def test_a_drifting_browser_rotating_networks_in_a_burst_is_linked(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    background = _background(1200, T0)
    seed = secrets.token_hex(4)
    base = desktop(seed, browser_version="131.0.88")
    now = T0 + 1200 * 50
    farm = [
        timed_event(now, "b0", base, "10.6.0.1"),
        timed_event(
            now + 60,
            "b1",
            desktop(seed, browser_version="131.0.88", screen_width=1366, screen_height=768),
            "10.6.1.1",
        ),
        timed_event(
            now + 120,
            "b2",
            desktop(seed, browser_version="131.0.88", languages=["it-IT"]),
            "10.6.2.1",
        ),
    ]
    first, second, third = (await replay_verdicts(guard, 2, background + farm))[-3:]
    assert second.identity == first.identity
    assert kinds(second) == [pb.LINK_KIND_DRIFT_BURST]
    assert list(second.explanation.links[0].changed) == ["screen"]
    # A rare browser is one person wherever it connects from.
    assert third.verdict == pb.VERDICT_DENY
    assert third.identity == first.identity
    assert third.explanation.scope == pb.SCOPE_BROWSER
    assert (third.explanation.scope_count, third.explanation.scope_threshold) == (2, 2)
    assert third.explanation.risk == 1


async def test_a_common_desktop_resizing_behind_a_new_proxy_each_time_is_linked_by_its_burst(
    any_server: RunningServer,
) -> None:
    """A farm on a common desktop configuration registers every 10 s with a
    new window size, each time through a new proxy. A stranger every two
    hours shares all of it but the window, so no single step is evidence (one
    could follow within a minute), but several steps within a minute, each
    from a network of its own, are: the burst joins them and the accounts
    beyond N are refused. The configuration's strangers, hours apart,
    stay apart, and so does one who comes half an hour after the burst.
    (It holds with the peak factor anywhere from 1 to 16, and fails
    without the burst.)"""
    guard = await guard_client(any_server)
    common = {
        "os_name": "Windows",
        "platform": "Win32",
        "browser_version": "131.0.6778.86",
        "fonts": [f"Windows Default {i}" for i in range(40)],
        "timezone": "America/Chicago",
        "extra": {"canvas": "windows-default"},
    }
    now = T0 + 1200 * 50
    events = _background(1200, T0)
    # A week of the configuration's owners, each on a screen of its own.
    for i in range(80):
        owner = fingerprint("win", screen_width=1200 + 4 * i, screen_height=700 + 2 * i, **common)
        events.append(
            timed_event(now - 160 * 3600 + i * 7200, f"win{i}", owner, f"10.5.{i}.{1 + i % 7}")
        )
    for j in range(6):
        farm = fingerprint("win", screen_width=1000 + 10 * j, screen_height=600 + 10 * j, **common)
        events.append(timed_event(now + 10 * j, f"farm{j}", farm, f"10.9.{j}.1"))
    late = fingerprint("win", screen_width=1111, screen_height=777, **common)
    events.append(timed_event(now + 1800, "late", late, "10.9.200.1"))
    events.sort(key=lambda event: event.event_time.ToNanoseconds())
    verdicts = await replay_verdicts(guard, 3, events)
    owners = [
        v
        for e, v in zip(events, verdicts, strict=True)
        if e.request.account.value.startswith("win")
    ]
    farm_verdicts, stranger = verdicts[-7:-1], verdicts[-1]
    assert all(v.verdict == pb.VERDICT_ALLOW for v in owners)
    assert len({v.identity for v in owners}) == len(owners)
    assert [v.verdict for v in farm_verdicts] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 3
    # The burst's link joins the farm's earlier identities (the later
    # fingerprints may then match the identity's profile instead).
    [burst, *_] = [v for v in farm_verdicts if pb.LINK_KIND_DRIFT_BURST in kinds(v)]
    assert kinds(burst)[0] == pb.LINK_KIND_DRIFT_BURST
    assert pb.LINK_KIND_MERGE in kinds(burst)
    assert list(burst.explanation.links[0].changed) == ["screen"]
    assert len({v.identity for v in farm_verdicts[2:]}) == 1
    assert farm_verdicts[-1].explanation.scope == pb.SCOPE_BROWSER
    assert stranger.verdict == pb.VERDICT_ALLOW
    assert not stranger.explanation.links


async def test_an_anti_detect_farm_changing_every_group_behind_new_proxies_is_linked_by_device(
    any_server: RunningServer,
) -> None:
    """A farm draws a new window size, a new language and a noise font for
    every account, each through a new proxy: no band holds two of its
    fingerprints, and none repeats a value. Only the device is left, and
    a stranger with that device comes every few hours: four new browsers
    of it within a minute, from four networks, are one farm, and the
    accounts beyond N are refused. The device's strangers stay apart."""
    guard = await guard_client(any_server)
    device = {"os_name": "Windows", "platform": "Win32", "browser_name": "Firefox"}
    fonts = [f"Windows Font {i}" for i in range(40)]
    tongues = [["pl-PL"], ["tr-TR"], ["nl-NL"], ["sv-SE"], ["cs-CZ"], ["hu-HU"], ["ro-RO"]]
    now = T0 + 1200 * 50
    events = _background(1200, T0)
    # A week of the device's owners, each a browser of its own.
    for i in range(40):
        owner = fingerprint(
            "ff", fonts=[*fonts[:30], f"Own Font {i}"], screen_width=1300 + 8 * i, **device
        )
        events.append(
            timed_event(now - 160 * 3600 + i * 14_400, f"ff{i}", owner, f"10.3.{i}.{1 + i % 5}")
        )
    for j in range(6):
        farm = fingerprint(
            "ff",
            fonts=[*fonts, f"Noise {j}"],
            screen_width=1000 + 12 * j,
            screen_height=600 + 8 * j,
            languages=tongues[j],
            **device,
        )
        events.append(timed_event(now + 20 * j, f"farm{j}", farm, f"10.2.{j}.1"))
    events.sort(key=lambda event: event.event_time.ToNanoseconds())
    verdicts = await replay_verdicts(guard, 3, events)
    owners = [
        v for e, v in zip(events, verdicts, strict=True) if e.request.account.value.startswith("ff")
    ]
    farm_verdicts = verdicts[-6:]
    assert all(v.verdict == pb.VERDICT_ALLOW for v in owners)
    assert len({v.identity for v in owners}) == len(owners)
    assert [v.verdict for v in farm_verdicts] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 3
    assert kinds(farm_verdicts[3]) == [pb.LINK_KIND_DRIFT_BURST] + [pb.LINK_KIND_MERGE] * 2
    assert set(farm_verdicts[3].explanation.links[0].changed) == {"screen", "language", "software"}
    assert len({v.identity for v in farm_verdicts[3:]}) == 1


async def test_a_drift_on_another_network_a_week_later_is_not_linked(
    any_server: RunningServer,
) -> None:
    """A link across networks rests on how often strangers showed the same
    components lately, and the book's rates look back 7 days: a week after
    a browser was last seen, nothing observed vouches for a link to it,
    however rare its components look. Minutes after, the same drift links."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    rare = {
        "browser_name": "Pale Moon",
        "os_name": "Haiku",
        "platform": "Haiku x86_64",
        "screen_width": 1013,
        "screen_height": 771,
        "languages": ["is-IS"],
        "timezone": "Atlantic/Reykjavik",
    }
    now = T0 + 1200 * 50
    events = [
        *_background(1200, T0),
        timed_event(now, "w0", desktop(seed, browser_version="131.0.88", **rare), "10.9.0.1"),
        timed_event(now + 60, "w1", desktop(seed, browser_version="131.0.89", **rare), "10.9.1.1"),
        timed_event(
            now + 8 * 24 * HOUR,
            "w2",
            desktop(seed, browser_version="131.0.95", **rare),
            "10.9.2.1",
        ),
    ]
    first, burst, later = (await replay_verdicts(guard, 3, events))[-3:]
    assert burst.identity == first.identity
    assert kinds(burst) == [pb.LINK_KIND_DRIFT_BURST]
    assert later.identity == later.explanation.fingerprint != first.identity
    assert not later.explanation.links


async def test_a_fresh_book_links_on_home_networks_only(any_server: RunningServer) -> None:
    """Before the book has seen 500 fingerprints it cannot know what is
    rare: the same burst across networks stays apart, a drift at home
    links (each backtest has a fresh book)."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    now = T0 + 300 * 50
    burst = [
        timed_event(now, "b0", desktop(seed), "10.8.0.1"),
        timed_event(
            now + 60, "b1", desktop(seed, screen_width=1366, screen_height=768), "10.8.1.1"
        ),
        timed_event(now + 120, "b2", desktop(seed, languages=["it-IT"]), "10.8.1.1"),
    ]
    first, second, third = (await replay_verdicts(guard, 2, _background(300, T0) + burst))[-3:]
    assert second.identity != first.identity
    assert not second.explanation.links
    assert third.identity == second.identity
    assert kinds(third) == [pb.LINK_KIND_DRIFT_SAME_NETWORK]


def _farm_and_return(seed: str, first_sizes: list[tuple[int, int]]) -> list[pb.BacktestEvent]:
    """A farm's first session (one browser, in these window sizes) and,
    hours later from another network, the browser back: updated, in a
    window size of its own, then a minute later in another one."""
    rare = {"languages": ["is-IS"], "timezone": "Atlantic/Reykjavik"}
    now = T0 + 1200 * 50
    first = [
        timed_event(
            now + 60 * i,
            f"f{i}",
            desktop(seed, browser_version="131.0.88", screen_width=w, screen_height=h, **rare),
            "10.7.0.1",
        )
        for i, (w, h) in enumerate(first_sizes)
    ]
    later = now + 6 * HOUR
    updated = {"browser_version": "131.0.95", **rare}
    back = [
        timed_event(
            later, "g0", desktop(seed, screen_width=1366, screen_height=768, **updated), "10.7.1.1"
        ),
        timed_event(
            later + 60,
            "g1",
            desktop(seed, screen_width=1280, screen_height=720, **updated),
            "10.7.1.1",
        ),
    ]
    return first + back


async def test_a_farmer_back_later_cycling_as_before_joins_its_farmed_identity(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    background = _background(1200, T0)
    # A farm's first session: one browser resizing its window at once (few
    # new browsers drift so soon), refused past the limit. Hours later,
    # from another network, the browser updated and resized: its
    # fingerprint starts an identity of its own (what stayed the same was
    # seen before by this browser only: at its own rate, which says nothing
    # of strangers); a minute later it resizes again. A stranger matching
    # what stayed the same would also have to be one of the few new
    # browsers that resize at once, as the farm's did: it is the farm back.
    events = _farm_and_return(secrets.token_hex(4), [(1920, 1080), (1600, 900), (1440, 900)])
    verdicts = (await replay_verdicts(guard, 2, background + events))[-5:]
    assert [v.verdict for v in verdicts[:3]] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY]
    assert len({v.identity for v in verdicts[:3]}) == 1
    started, returned = verdicts[3:]
    assert started.identity != verdicts[0].identity
    assert pb.LINK_KIND_MERGE in kinds(returned)
    [merge] = [link for link in returned.explanation.links if link.kind == pb.LINK_KIND_MERGE]
    assert merge.confidence > 0.99
    # The farm's earlier accounts count: every network counts once refused.
    assert returned.verdict == pb.VERDICT_DENY
    assert returned.explanation.scope == pb.SCOPE_BROWSER


async def test_a_new_browser_cycling_does_not_join_an_older_one_that_never_did(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    background = _background(1200, T0)
    # The same return, but the older identity never drifted: that the new
    # one resizes at once says nothing of its being that browser, so what
    # stayed the same must be rare enough on its own over the hours
    # between, and here it is not.
    events = _farm_and_return(secrets.token_hex(4), [(1920, 1080)] * 3)
    verdicts = (await replay_verdicts(guard, 2, background + events))[-5:]
    assert [v.verdict for v in verdicts[:3]] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY]
    started, returned = verdicts[3:]
    assert returned.identity == started.identity != verdicts[0].identity
    assert pb.LINK_KIND_MERGE not in kinds(returned)
    assert returned.verdict == pb.VERDICT_ALLOW


async def test_a_rare_browser_rotating_networks_is_refused_as_one(
    any_server: RunningServer,
) -> None:
    """A day after the book started (a book in its first day counts a
    fingerprint strangers may share per network: the suite's shared book
    is in its first day, so this runs on a backtest's book of its own), a
    browser nobody else has signs up a minute apart from a new network each
    time: one browser, refused from the fourth account as one."""
    guard = await guard_client(any_server)
    same = browser()
    later = T0 + 26 * HOUR
    events = _background(1200, T0) + [
        timed_event(later + 60 * i, f"r{i}", same, fresh_network()) for i in range(6)
    ]
    verdicts = (await replay_verdicts(guard, 3, events))[-6:]
    assert [v.verdict for v in verdicts] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 3
    assert {v.explanation.scope for v in verdicts[3:]} == {pb.SCOPE_BROWSER}
    assert not signal(verdicts[-1], "popularity").fired


T0 = 1_790_000_000.0
HOUR = 3600.0


async def test_identical_devices_on_unrelated_networks_are_counted_apart(
    any_server: RunningServer,
) -> None:
    """A phone model with default settings, seen by many people on their own
    networks: once it is popular, each network counts for itself."""
    guard = await guard_client(any_server)
    phone = browser()
    events = [timed_event(T0 + i * HOUR, f"p{i}", phone, f"10.1.{i}.1") for i in range(8)] + [
        # The same phone again from one of those networks, then once more.
        timed_event(T0 + 9 * HOUR, "p-again", phone, "10.1.7.1"),
        timed_event(T0 + 9 * HOUR + 60, "p-last", phone, "10.1.7.1"),
    ]
    verdicts = await replay_verdicts(guard, 1, events)
    popular = [v for v in verdicts[:8] if signal(v, "popularity").fired]
    assert popular, "the fingerprint became popular"
    assert all(v.verdict == pb.VERDICT_ALLOW for v in popular)
    # Before it was popular, it was one browser: the second network's
    # registration an hour later was refused.
    assert verdicts[1].verdict == pb.VERDICT_DENY
    assert verdicts[1].explanation.scope == pb.SCOPE_BROWSER
    assert verdicts[8].verdict == pb.VERDICT_DENY
    assert verdicts[8].explanation.scope == pb.SCOPE_NETWORK


async def test_a_burst_on_a_popular_fingerprint_is_refused_by_velocity(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    phone = browser()
    # A week of people, one every few hours, each on a network of their own.
    history = [timed_event(T0 + i * 3 * HOUR, f"old{i}", phone, f"10.2.{i}.1") for i in range(40)]
    # Then one person through a new network per account, a minute apart.
    now = T0 + 40 * 3 * HOUR + 5 * HOUR
    burst = [timed_event(now + i * 60, f"burst{i}", phone, f"10.3.{i}.1") for i in range(10)]
    verdicts = await replay_verdicts(guard, 2, history + burst)
    assert all(v.verdict == pb.VERDICT_ALLOW for v in verdicts[:40])
    refused = [v for v in verdicts[40:] if v.verdict == pb.VERDICT_DENY]
    assert len(refused) >= 5
    assert {v.explanation.scope for v in refused} == {pb.SCOPE_VELOCITY}
    fired = [s for s in refused[0].explanation.signals if s.name.startswith("velocity_")]
    assert fired and fired[0].fired
    assert signal(refused[0], "rate_per_hour").value > 0


async def _last_day_of_a_popular_phone(
    server: RunningServer, day: list[float], days: int
) -> list[pb.EvaluateResponse]:
    """A phone model many people own, made popular first (people hours
    apart, each on a new network), then registering at `day`'s offsets
    every day for `days` days, each time by someone on a network of their
    own: the last day's verdicts at N = 3."""
    guard = await guard_client(server)
    phone = browser()
    events = [timed_event(T0 + i * 3 * HOUR, f"seed{i}", phone, f"10.6.{i}.1") for i in range(6)]
    day0 = T0 + 24 * HOUR
    times = [day0 + d * 24 * HOUR + offset for d in range(days) for offset in day]
    for n, when in enumerate(times):
        events.append(timed_event(when, f"d{n}", phone, f"10.7.{n // 250}.{1 + n % 250}"))
    verdicts = await replay_verdicts(guard, 3, events)
    return verdicts[-len(day) :]


async def test_a_popular_fingerprint_busy_for_hours_is_not_taken_for_a_burst(
    any_server: RunningServer,
) -> None:
    """A phone model many people own, seen 8 times an hour for 16 hours a
    day, each time by someone on a network of their own: its normal rate is
    what velocity measures against, so on the third day none of them is
    refused. (Counted in hour slots, a fingerprint seen in every busy hour
    looked seen about once an hour however many came.)"""
    last_day = await _last_day_of_a_popular_phone(
        any_server, [i * 450.0 for i in range(16 * 8)], days=3
    )
    refused = [v for v in last_day if v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(last_day[-1], "popularity").fired


async def test_a_popular_fingerprint_busy_in_the_evenings_is_not_taken_for_a_burst(
    any_server: RunningServer,
) -> None:
    """A phone model many people use in the evening: 10 an hour for 8
    hours, 2 an hour otherwise, each on a network of their own. Its busy
    hours' slots are all full, its quiet hours' mostly empty; on the fourth
    day none of its owners is refused. (One estimate over the whole week
    took each full slot for one sighting, a rate under the day's mean, and
    velocity refused 7 of the fourth day's 112 in its evening.)"""
    day = [*(i * 1800.0 for i in range(32)), *(16 * HOUR + i * 360.0 for i in range(80))]
    last_day = await _last_day_of_a_popular_phone(any_server, day, days=4)
    refused = [v for v in last_day if v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(last_day[-1], "popularity").fired


async def test_a_phone_seen_more_often_than_its_slots_can_show_is_judged_by_its_count(
    any_server: RunningServer,
) -> None:
    """A phone model everyone in a big market owns: 40 registrations an hour,
    day and night, each by someone on a network of their own. Seen in every
    10-minute slot, its slots alone put its rate at 19 an hour, and on the
    third day the 24-hour window refused 383 of its 960 owners. Counted
    once its slots are full, it is seen 44 an hour, and none is refused."""
    last_day = await _last_day_of_a_popular_phone(
        any_server, [i * 90.0 for i in range(24 * 40)], days=3
    )
    refused = [v for v in last_day if v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(last_day[-1], "popularity").fired
    assert signal(last_day[-1], "rate_per_hour").value > 40


async def test_a_popular_phones_new_browser_version_is_not_taken_for_a_burst(
    any_server: RunningServer,
) -> None:
    """A browser update everyone on a popular phone model gets: the new
    version's fingerprint is new, and within hours its owners register 14
    times an hour, each on a network of their own. None of them is refused:
    seen in one 80-minute period after another, it is no single burst, and
    its young rate needs little of the prior a first burst is judged with.
    (With the whole prior, a day of "not seen", its rate in its first day
    stayed a fraction of the true one, and velocity refused 18 of them.)"""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    phone = fingerprint(seed)
    updated = fingerprint(seed, browser_version="132.0.6834.83")
    events = [timed_event(T0 + i * 3 * HOUR, f"old{i}", phone, f"10.8.{i}.1") for i in range(6)]
    start = T0 + 24 * HOUR
    # The update rolls out: 2 owners an hour (it becomes popular), doubling
    # every two hours, then 14 an hour for 10 hours.
    times: list[float] = []
    hour = 0.0
    for per_hour, hours in ((2, 2), (4, 2), (8, 2), (14, 10)):
        times += [start + (hour + i / per_hour) * HOUR for i in range(per_hour * hours)]
        hour += hours
    for n, when in enumerate(times):
        events.append(timed_event(when, f"new{n}", updated, f"10.9.{n // 250}.{1 + n % 250}"))
    verdicts = (await replay_verdicts(guard, 3, events))[6:]
    refused = [v for v in verdicts if v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(verdicts[-1], "popularity").fired
    assert len({v.identity for v in verdicts}) == 1


async def test_a_popular_phone_in_a_fresh_books_first_hours_is_judged_by_its_own_rate(
    any_server: RunningServer,
) -> None:
    """A book's first hours (a new deployment, or a backtest's start): a
    fingerprint many people share comes three times, 40 minutes apart (it
    is popular), then from the fourth hour 14 times an hour for 12 hours,
    each owner on a network of their own. Its first hour at that pace is
    a jump against the hours before (the rate leaves the last hour out),
    which velocity may refuse; from 90 minutes on, nobody is refused: its
    rate is taken over the hours the book watched. (Taken as "not seen" for
    a day before its first sighting, time nobody was looking, its rate
    stayed a fraction of the true one, and velocity refused 5 more.)"""
    guard = await guard_client(any_server)
    phone = fingerprint(secrets.token_hex(4))
    times = [T0, T0 + 2400, T0 + 4800]
    stream = T0 + 4 * HOUR
    times += [stream + (i + 1) / 14 * HOUR for i in range(14 * 12)]
    events = [
        timed_event(when, f"owner{n}", phone, f"10.10.{n // 250}.{1 + n % 250}")
        for n, when in enumerate(times)
    ]
    verdicts = await replay_verdicts(guard, 3, events)
    later = [v for when, v in zip(times, verdicts, strict=True) if when > stream + 1.5 * HOUR]
    refused = [v for v in later if v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(verdicts[-1], "popularity").fired
    assert signal(verdicts[-1], "rate_per_hour").value > 10


async def test_a_popular_phone_whose_day_picks_up_in_a_fresh_books_first_day_is_let_in(
    any_server: RunningServer,
) -> None:
    """A book's first day (a new deployment, or a backtest's start): a
    fingerprint many people share comes 3 times an hour through the night,
    then its day picks up, 10 more an hour every hour up to 60, each owner
    on a network of their own. Nobody is refused: velocity judges the day's
    pace by the identity's last six hours. (By its average over every hour
    the book watched, the quiet ones included, 42 of its 210 daytime owners
    were refused.)"""
    guard = await guard_client(any_server)
    phone = fingerprint(secrets.token_hex(4))
    times = [T0 + i * 1200.0 for i in range(18)]
    day = T0 + 6 * HOUR
    for hour, per_hour in enumerate(range(10, 70, 10)):
        times += [day + (hour + i / per_hour) * HOUR for i in range(per_hour)]
    events = [
        timed_event(when, f"owner{n}", phone, f"10.13.{n // 250}.{1 + n % 250}")
        for n, when in enumerate(times)
    ]
    verdicts = await replay_verdicts(guard, 3, events)
    refused = [v for v in verdicts[18:] if v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(verdicts[-1], "popularity").fired
    assert signal(verdicts[-1], "rate_per_hour").value > 40


async def test_a_burst_on_a_popular_phone_in_a_fresh_books_first_day_is_refused_by_velocity(
    any_server: RunningServer,
) -> None:
    """The same first day's rule gives a burst no room: a fingerprint many
    people share, 6 an hour at random for 8 hours, then one person registering 12
    accounts in 6 minutes, each through a new network. The burst is a slot
    or two of the six hours its rate is taken over (and its last minutes
    are left out), so velocity refuses it."""
    guard = await guard_client(any_server)
    phone = fingerprint(secrets.token_hex(4))
    arrivals = random.Random(11)
    times = [T0]
    while times[-1] < T0 + 8 * HOUR:
        times.append(times[-1] + arrivals.expovariate(6 / HOUR))
    events = [
        timed_event(when, f"owner{n}", phone, f"10.14.{n // 250}.{1 + n % 250}")
        for n, when in enumerate(times)
    ]
    owners = len(events)
    burst = times[-1] + 300
    events += [
        timed_event(burst + 30 * i, f"farmed{i}", phone, f"10.15.0.{1 + i}") for i in range(12)
    ]
    verdicts = await replay_verdicts(guard, 3, events)
    assert all(v.verdict == pb.VERDICT_ALLOW for v in verdicts[owners - 12 : owners])
    refused = [v for v in verdicts[owners:] if v.verdict == pb.VERDICT_DENY]
    assert len(refused) >= 3, verdicts[-1].explanation
    assert {v.explanation.scope for v in refused} == {pb.SCOPE_VELOCITY}
    assert signal(refused[0], "popularity").fired


async def test_a_phone_everyone_uses_is_popular_within_a_fresh_books_first_hours(
    any_server: RunningServer,
) -> None:
    """A book's first hours: a fingerprint so common that its owners come
    every 5 minutes from the start, each on a network of their own, never
    30 minutes apart. Until the book has seen a quiet hour, such a stream
    is no evidence of one browser: every two hours of it make another
    episode, so it is popular within four hours and nobody is refused
    after. (As one episode, it stayed one browser all day: 93 of its 96
    owners were refused; now 45, all in those four hours.) A farm rotating
    networks for an hour beside it still gets the limit."""
    guard = await guard_client(any_server)
    phone = fingerprint(secrets.token_hex(4))
    farm = fingerprint(secrets.token_hex(4))
    events = [
        timed_event(T0 + n * 300, f"owner{n}", phone, f"10.11.{n // 250}.{1 + n % 250}")
        for n in range(12 * 8)
    ]
    events += [
        timed_event(T0 + 60 + n * 180, f"farmed{n}", farm, f"10.12.{n // 250}.{1 + n % 250}")
        for n in range(20)
    ]
    events.sort(key=lambda e: e.event_time.ToNanoseconds())
    verdicts = await replay_verdicts(guard, 3, events)
    owners = [
        (e.event_time.ToNanoseconds() / 1e9 - T0, v)
        for e, v in zip(events, verdicts, strict=True)
        if e.request.account.value.startswith("owner")
    ]
    refused = [v for t, v in owners if t > 4.5 * HOUR and v.verdict == pb.VERDICT_DENY]
    assert not refused, (len(refused), refused[0].explanation if refused else None)
    assert signal(owners[-1][1], "popularity").fired
    farmed = [
        v
        for e, v in zip(events, verdicts, strict=True)
        if e.request.account.value.startswith("farmed")
    ]
    assert sum(v.verdict == pb.VERDICT_ALLOW for v in farmed) == 3


async def test_anti_detect_profiles_cycling_settings_link_by_profile(
    any_server: RunningServer,
) -> None:
    """Each account in a window size and a language from a small set, fonts
    with noise and a new canvas, through a new network: several groups
    change at once, but each value is one this browser showed minutes ago.
    (A backtest: a day of other people first, so the book knows which
    values are common.)"""
    guard = await guard_client(any_server)
    rng = random.Random(11)  # the farm's choices: the same in every run
    background = _background(1500, T0)
    seed = secrets.token_hex(4)
    fonts = [f"Font {seed} {i}" for i in range(40)]
    farm_sizes = [(1280, 1024), (1600, 900), (1680, 1050)]
    farm_tongues = [["pl-PL"], ["tr-TR"], ["nl-NL"]]
    farm = []
    for i in range(12):
        w, h = rng.choice(farm_sizes)
        variant = fingerprint(
            seed,
            screen_width=w,
            screen_height=h,
            languages=rng.choice(farm_tongues),
            fonts=[*fonts[: 38 + i % 3], f"Noise {seed} {i}"],
            extra={"canvas": secrets.token_hex(8)},
            browser_version="131.0.77",
        )
        farm.append(timed_event(T0 + 1500 * 50 + i * 90, f"ad{i}", variant, f"10.5.{i}.1"))
    verdicts = (await replay_verdicts(guard, 3, background + farm))[1500:]
    assert pb.LINK_KIND_PROFILE in {kind for v in verdicts for kind in kinds(v)}
    # A profile that started twice (the second variant shared no value with
    # the first) may stay two identities: the farm gets at most twice the limit.
    assert len({v.identity for v in verdicts}) <= 2
    assert sum(v.verdict == pb.VERDICT_ALLOW for v in verdicts) <= 2 * 3


async def test_a_profile_match_joins_a_browser_that_cycles_not_one_that_never_changed(
    any_server: RunningServer,
) -> None:
    """Two rare browsers of one device, each followed minutes later, from
    another network, by a fingerprint showing their version, window and
    languages with other software (fonts, canvas). The one that already
    cycled (its window changed at home) is joined by profile; the one that
    never changed is not: a stranger need only match it, where it would
    have to start cycling, as few new browsers do."""
    guard = await guard_client(any_server)
    rare = {"browser_version": "131.0.77", "screen_width": 1013, "screen_height": 771}
    now = T0 + 1500 * 50
    events = _background(1500, T0)
    for name, tongue, offset in (("steady", "is-IS", 0), ("cycling", "mt-MT", 600)):
        seed = secrets.token_hex(4)
        mine = {**rare, "languages": [tongue]}
        home = f"10.11.{offset // 600}.1"
        events.append(timed_event(now + offset, f"{name}0", desktop(seed, **mine), home))
        if name == "cycling":
            moved = {**mine, "screen_width": 1009, "screen_height": 767}
            events.append(timed_event(now + offset + 60, f"{name}1", desktop(seed, **moved), home))
        events.append(
            timed_event(
                now + offset + 120,
                f"{name}2",
                desktop(secrets.token_hex(4), **mine),
                f"10.12.{offset // 600}.1",
            )
        )
    verdicts = (await replay_verdicts(guard, 3, events))[1500:]
    steady, steady_other, cycling, cycling_moved, cycling_other = verdicts
    assert steady_other.identity == steady_other.explanation.fingerprint != steady.identity
    assert not steady_other.explanation.links
    assert kinds(cycling_moved) == [pb.LINK_KIND_DRIFT_SAME_NETWORK]
    assert cycling_other.identity == cycling.identity
    assert kinds(cycling_other) == [pb.LINK_KIND_PROFILE]


async def test_fonts_near_a_farms_noisy_sets_are_no_evidence_when_the_set_is_common(
    any_server: RunningServer,
) -> None:
    """An anti-detect farm on a phone adds a font to the model's default
    set on each account, cycling its window and language. Its variants join
    by profile; a stranger with the plain default set and the farm's
    version, a minute later, does not: a set near the farm's is evidence
    only when the set itself is rare, and hundreds of that phone's owners
    show the defaults. (The previous rule took the farm's noisy sets'
    share for the stranger's, and joined it.)"""
    guard = await guard_client(any_server)
    rng = random.Random(12)  # the same world in every run
    phone = {"os_name": "Android", "platform": "Linux armv8l", "pixel_ratio": 2.625}
    defaults = [f"Phone Default {i}" for i in range(9)]
    tongues = [["en-US", "en"], ["de-DE", "de"], ["fr-FR"], ["es-ES"], ["it-IT"]]
    day = 86_400.0
    events = _background(1500, T0)
    # Eight days of the phone's owners (the default set is common), then a
    # day of desktops: the phone's own rate stays low.
    for i in range(800):
        owner = fingerprint(
            f"ph{i}",
            fonts=defaults,
            languages=rng.choice(tongues),
            browser_version=f"131.0.{rng.randrange(20)}",
            **phone,
        )
        when = T0 - 8 * day + i * 864
        events.append(timed_event(when, f"ph{i}", owner, f"10.6.{i % 250}.{1 + i // 250}"))
    now = T0 + 1500 * 50
    # Home, then a window changed at home, then new networks.
    shown = [
        ((1013, 771), ["pl-PL"], "10.7.0.1"),
        ((1009, 767), ["pl-PL"], "10.7.0.1"),
        ((1009, 767), ["tr-TR"], "10.7.1.1"),
        ((1013, 771), ["tr-TR"], "10.7.2.1"),
    ]
    for i, ((w, h), tongue, ip) in enumerate(shown):
        variant = fingerprint(
            "farm",
            fonts=[*defaults, f"Noise {i}"],
            screen_width=w,
            screen_height=h,
            languages=tongue,
            browser_version="131.0.77",
            extra={"canvas": secrets.token_hex(8)},
            **phone,
        )
        events.append(timed_event(now + i * 90, f"farm{i}", variant, ip))
    stranger = fingerprint(
        "stranger",
        fonts=defaults,
        screen_width=393,
        screen_height=873,
        languages=["da-DK"],
        browser_version="131.0.77",
        **phone,
    )
    events.append(timed_event(now + 330, "stranger", stranger, "10.8.0.1"))
    events.sort(key=lambda event: event.event_time.ToNanoseconds())
    verdicts = await replay_verdicts(guard, 3, events)
    farm, last = verdicts[-5:-1], verdicts[-1]
    assert pb.LINK_KIND_PROFILE in {kind for v in farm for kind in kinds(v)}
    assert len({v.identity for v in farm}) == 1
    assert last.identity == last.explanation.fingerprint != farm[0].identity
    assert not last.explanation.links
    assert last.verdict == pb.VERDICT_ALLOW


def _stranger_with_a_farms_defaults() -> list[pb.BacktestEvent]:
    """A day of desktops; over eight days before it, 200 owners of one phone
    (an eighth of the fingerprints) with its defaults, each in a language of
    their own (the book counts fingerprints, not browsers); then a farm on
    that phone's defaults switching language behind new networks, and a
    minute later a stranger with the defaults in yet another language."""
    phone = {
        "os_name": "Android",
        "platform": "Linux armv8l",
        "pixel_ratio": 2.625,
        "screen_width": 393,
        "screen_height": 873,
        "fonts": [f"Phone Default {i}" for i in range(9)],
        "browser_version": "131.0.5",
        "extra": {"canvas": "phone-default"},
    }
    events = _background(1500, T0)
    for i in range(200):
        own_tongue = f"en-{chr(65 + i // 26)}{chr(65 + i % 26)}"
        owner = fingerprint(f"ph{i}", languages=[own_tongue], **phone)
        events.append(timed_event(T0 - 8 * 86_400.0 + i * 3456, f"ph{i}", owner, f"10.9.{i}.1"))
    now = T0 + 1500 * 50
    # The first two on one network (a drift there), the rest each on a new one.
    farm = [("pl-PL", "10.10.0.1"), ("tr-TR", "10.10.0.1"), ("nl-NL", "10.10.1.1")]
    farm += [("pl-PL", "10.10.2.1"), ("tr-TR", "10.10.3.1")]
    for i, (tongue, ip) in enumerate(farm):
        variant = fingerprint("farm", languages=[tongue], **phone)
        events.append(timed_event(now + i * 90, f"farm{i}", variant, ip))
    stranger = fingerprint("stranger", languages=["da-DK"], **phone)
    events.append(timed_event(now + (len(farm) - 1) * 90 + 60, "stranger", stranger, "10.10.9.1"))
    return sorted(events, key=lambda event: event.event_time.ToNanoseconds())


async def test_strict_profile_links_keep_a_stranger_with_a_phones_defaults_out_of_a_farm(
    any_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A farm on a phone's defaults switches language behind new networks;
    a stranger with the same defaults comes a minute later. By the shares
    of all fingerprints (the default), the phone's screen, fonts and version
    look rare, and the stranger joins the farm by profile. With
    TETHER_GUARD_STRICT_PROFILE_LINKS, nearly every owner of that phone
    shows them: the stranger stays apart."""
    events = _stranger_with_a_farms_defaults()
    loose = await replay_verdicts(await guard_client(any_server), 3, events)
    # On the same kind of database as the server it is compared with.
    sqlite = any_server.app.runtime.settings.database_url.startswith("sqlite")
    strict_server = await start_server(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}" if sqlite else postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        guard_strict_profile_links=True,
    )
    try:
        strict = await replay_verdicts(await guard_client(strict_server), 3, events)
    finally:
        await strict_server.stop()
    farm, stranger = loose[-6:-1], loose[-1]
    assert stranger.identity == farm[-1].identity
    assert pb.LINK_KIND_PROFILE in kinds(stranger)
    farm, stranger = strict[-6:-1], strict[-1]
    assert stranger.identity == stranger.explanation.fingerprint != farm[-1].identity
    assert not stranger.explanation.links


async def test_two_identities_one_fingerprint_joins_are_merged(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=5)
    home = fresh_network()
    seed = secrets.token_hex(4)
    # Two variants that differ in three groups: each its own identity.
    a = await guard.evaluate(service, "register", account("m1"), fingerprint(seed), home)
    b_variant = fingerprint(
        seed, browser_version="140.0", screen_width=800, screen_height=600, languages=["ja"]
    )
    b = await guard.evaluate(service, "register", account("m2"), b_variant, home)
    assert a.identity != b.identity
    # A third differs from each in at most two: it ties both.
    bridge = fingerprint(seed, browser_version="140.0", screen_width=800, screen_height=600)
    c = await guard.evaluate(service, "register", account("m3"), bridge, home)
    assert pb.LINK_KIND_MERGE in kinds(c)
    after_a = await guard.evaluate(service, "register", account("m1"), fingerprint(seed), home)
    after_b = await guard.evaluate(service, "register", account("m2"), b_variant, home)
    assert after_a.identity == after_b.identity == c.identity
    # The merged identity's accounts count together.
    assert after_a.reason == pb.VERDICT_REASON_ALREADY_COUNTED
    assert after_a.count == 3


@pytest.mark.parametrize("common", [True, False], ids=["common", "rare"])
async def test_an_identity_strangers_share_is_never_merged(
    any_server: RunningServer, common: bool
) -> None:
    """The bridge of the test above, on iPhones, in a backtest's first day.
    When the first browser shows a phone's defaults (three hundred
    strangers came with that set-up in the last two hours, on ten versions
    and thirty languages and time zones, and the first shows one of those
    versions and one of those languages), the bridge links to the rare
    variant and leaves the defaults apart: merged, everyone who shows them
    would count as the variant's browser. The same bridge merges both when
    the strangers' phones had other fonts."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    model = seed if common else secrets.token_hex(4)
    versions = [f"18.{minor}" for minor in range(10)]
    places = [
        {"languages": [tongue], "timezone": f"Etc/GMT+{zone}"}
        for tongue in ("en-US", "de-DE", "fr-FR")
        for zone in range(10)
    ]
    # Every version in every place but the last pair, which the first
    # browser shows.
    pairs = [(v, place) for v in versions for place in places][:-1]
    later = T0 + 1200 * 50
    strangers = [
        timed_event(
            later + i * 24,
            f"s{i}",
            fingerprint(model, **iphone(model, browser_version=v, **place)),
            f"10.{5 + i // 250}.{i % 250}.1",
        )
        for i, (v, place) in enumerate(pairs)
    ]
    home, start = "10.7.0.1", later + 2 * HOUR
    a = fingerprint(seed, **iphone(seed, browser_version=versions[-1], **places[-1]))
    changed = {"browser_version": "19.0", "screen_width": 800, "screen_height": 600}
    b = fingerprint(seed, **iphone(seed, **changed, languages=["ja"]))
    bridge = fingerprint(seed, **iphone(seed, **changed, **places[-1]))
    ours = [
        timed_event(start + 60 * i, f"m{i}", components, home)
        for i, components in enumerate((a, b, bridge, a, b))
    ]
    verdicts = await replay_verdicts(guard, 1000, _background(1200, T0) + strangers + ours)
    first, second, joined, after_a, after_b = verdicts[-5:]
    assert first.identity != second.identity
    assert joined.identity in (first.identity, second.identity)
    if common:
        assert pb.LINK_KIND_MERGE not in kinds(joined)
        assert (after_a.identity, after_b.identity) == (first.identity, second.identity)
    else:
        assert pb.LINK_KIND_MERGE in kinds(joined)
        assert after_a.identity == after_b.identity == joined.identity


async def test_a_crowded_network_is_a_signal(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    nat = fresh_network()
    verdicts = [
        await guard.evaluate(service, "register", account(f"c{i}"), browser(), nat)
        for i in range(10)
    ]
    crowd = signal(verdicts[-1], "network_browsers")
    assert crowd.value >= 9
    assert crowd.fired
    assert not signal(verdicts[0], "network_browsers").fired


async def test_a_thousand_registrations_from_ten_linked_variants_admit_exactly_the_limit(
    pg_server: RunningServer,
) -> None:
    guard = await guard_client(pg_server)
    limit = 4
    service = await new_service(guard, register_limit=limit)
    home = fresh_network()
    seed = secrets.token_hex(4)
    # Window sizes and languages: whichever variant the server sees first,
    # every other differs from it in two groups at most.
    variants = [
        fingerprint(seed, screen_width=1000 + 10 * i, languages=[f"l{i}-XX"]) for i in range(10)
    ]
    verdicts = await asyncio.gather(
        *(
            guard.evaluate(service, "register", account(f"v{i}"), variants[i % 10], home)
            for i in range(1000)
        )
    )
    assert len({v.identity for v in verdicts}) == 1
    assert len({v.explanation.fingerprint for v in verdicts}) == 10
    assert sum(v.verdict == pb.VERDICT_ALLOW for v in verdicts) == limit


async def test_logins_and_rooms_count_the_same_identity(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, login_limit=2, collaborate_limit=2)
    home = fresh_network()
    seed = secrets.token_hex(4)
    variants = [
        fingerprint(seed),
        fingerprint(seed, languages=["es-ES"]),
        fingerprint(seed, screen_width=1280),
    ]
    logins = [
        await guard.evaluate(service, "login", account(f"l{i}"), variants[i], home)
        for i in range(3)
    ]
    assert [v.verdict for v in logins] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY]
    assert len({v.identity for v in logins}) == 1
    joins = [
        await guard.evaluate(
            service, "collaborate", account(f"j{i}"), variants[2 - i], home, room_id="room-x"
        )
        for i in range(3)
    ]
    assert [v.verdict for v in joins] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY]
    assert joins[2].explanation.scope == pb.SCOPE_BROWSER
    # Logging out through any of its fingerprints frees the identity's slot.
    assert await guard.end_login(service, logins[0].identity, account("l0"))
    again = await guard.evaluate(service, "login", account("l2"), variants[2], home)
    assert again.verdict == pb.VERDICT_ALLOW


@pytest.mark.parametrize("common", [True, False], ids=["common", "rare"])
async def test_a_farms_mark_reaches_other_networks_unless_strangers_share_its_fingerprint(
    any_server: RunningServer, common: bool
) -> None:
    """A farm refused as one browser marks its identity: from then on its
    accounts from every network count. A fingerprint that many of the
    browsers seen would show exactly (one device's defaults, only the
    version apart) says nothing of who comes with it later from elsewhere:
    a stranger there is counted on their own network. A fingerprint nobody
    else shows stays marked everywhere."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    # A hundred people with one device and its defaults, only their browser
    # versions apart, each on a network of their own (if the fingerprint is
    # common); else a hundred other people's desktops.
    history = [
        timed_event(
            T0 + i * 60,
            f"bg{i}",
            desktop(seed, browser_version=f"131.0.6778.{i}")
            if common
            else desktop(f"{seed}-{i}", os_name=f"OS {seed} {i}"),
            f"10.4.{i}.1",
        )
        for i in range(100)
    ]
    farmed = desktop(seed, browser_version="131.0.6778.200")
    farm = [timed_event(T0 + 2 * HOUR + i * 60, f"farm{i}", farmed, "10.5.0.1") for i in range(4)]
    # Past the rotation window, the fingerprint from another network.
    later = [timed_event(T0 + 10 * HOUR, "later", farmed, "10.6.0.1")]
    verdicts = await replay_verdicts(guard, 3, history + farm + later)
    assert all(v.verdict == pb.VERDICT_ALLOW for v in verdicts[:103])
    assert verdicts[103].verdict == pb.VERDICT_DENY
    assert verdicts[103].explanation.scope == pb.SCOPE_BROWSER
    last = verdicts[104]
    sharers = signal(last, "fingerprint_sharers")
    assert sharers.threshold == 0.5
    assert sharers.fired is common
    assert (sharers.value >= 0.5) is common
    if common:
        assert last.verdict == pb.VERDICT_ALLOW
    else:
        assert last.verdict == pb.VERDICT_DENY
        assert last.explanation.scope == pb.SCOPE_BROWSER
        assert last.explanation.scope_count == 3


async def test_a_farmed_identity_counted_per_network_is_refused_its_burst(
    any_server: RunningServer,
) -> None:
    """A farm whose fingerprint strangers share counts per network even
    once it is marked (previous test), so rotating networks would get it N
    accounts on each. Back days later, its second registration within 10
    minutes, from any network, is its burst, where every network's accounts
    count: its identity is seen too seldom for a stranger to register that
    soon after it. One alone, or one after the 10 minutes, is let in."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    history = [
        timed_event(
            T0 + i * 60, f"bg{i}", desktop(seed, browser_version=f"131.0.6778.{i}"), f"10.4.{i}.1"
        )
        for i in range(100)
    ]
    farmed = desktop(seed, browser_version="131.0.6778.200")
    farm = [timed_event(T0 + 2 * HOUR + i * 60, f"farm{i}", farmed, "10.5.0.1") for i in range(4)]
    back = T0 + 74 * HOUR
    later = [
        timed_event(back + minutes * 60, f"back{i}", farmed, f"10.6.{i}.1")
        for i, minutes in enumerate((0, 5, 15))
    ]
    verdicts = await replay_verdicts(guard, 3, history + farm + later)
    assert verdicts[103].explanation.scope == pb.SCOPE_BROWSER  # marked farmed
    first, burst, after = verdicts[104:]
    assert first.verdict == pb.VERDICT_ALLOW
    assert burst.verdict == pb.VERDICT_DENY
    # Every network's accounts counted: the three of its first session and
    # the one just now.
    assert burst.explanation.scope == pb.SCOPE_BROWSER
    fired = signal(burst, "farm_burst_10m")
    assert (fired.value, fired.threshold, fired.fired) == (4, 3, True)
    assert after.verdict == pb.VERDICT_ALLOW


def _farm_session_then_return(
    seed: str,
    farmed: bool,
    returning: int = 4,
    stranger: bool = False,
    after: float = 3 * 24 * HOUR,
) -> list[pb.BacktestEvent]:
    """A farm on a rare desktop signs up from its home network (five
    accounts: refused beyond the limit, so marked farmed; or three: never
    refused), and three days later, its browser updated, from a network it
    never used, signs up again every minute. With `stranger`, someone else
    with the same set-up, a version between the farm's two, signs up once
    from a home of their own the day before the farm comes back."""
    rare = {"languages": ["is-IS"], "timezone": "Atlantic/Reykjavik"}
    now = T0 + 1200 * 50
    first = [
        timed_event(now + 60 * i, f"s{i}", desktop(seed, browser_version="131.0.88", **rare),
                    "10.11.0.1")
        for i in range(5 if farmed else 3)
    ]  # fmt: skip
    back = now + after
    if stranger:
        first.append(
            timed_event(back - 24 * HOUR, "someone",
                        desktop(seed, browser_version="131.0.93", **rare), "10.11.2.1")
        )  # fmt: skip
    later = [
        timed_event(back + 60 * i, f"r{i}", desktop(seed, browser_version="131.0.97", **rare),
                    "10.11.1.1")
        for i in range(returning)
    ]  # fmt: skip
    return _background(1200, T0) + first + later


async def test_a_farm_back_days_later_after_an_update_is_joined_at_its_third_account(
    any_server: RunningServer,
) -> None:
    """Days later from another network, an updated browser is a stranger as
    far as its components go (one like it could come in three days). But
    a new browser signing up its third account within its first hour is
    farming, and one that differs only by its update from a browser
    refused for farming is that farm back: the third is refused, counted
    with the farm's accounts, and the link says why. A browser that never
    farmed gets the same three accounts back (no mark, no join)."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    events = _farm_session_then_return(seed, farmed=True)
    verdicts = await replay_verdicts(guard, 3, events)
    session, back = verdicts[-9:-4], verdicts[-4:]
    assert [v.verdict for v in session] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 2
    farm = session[0].identity
    # Nothing links the update across networks three days on...
    assert back[0].identity != farm
    assert not back[0].explanation.links
    assert back[1].identity == back[0].identity
    # ... until the new browser signs up its third account within the hour.
    assert [v.verdict for v in back] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY] * 2
    third = back[2]
    assert third.identity == farm
    [link] = [link for link in third.explanation.links if link.kind == pb.LINK_KIND_FARM_RETURN]
    assert (getattr(link, "from"), link.to) == (back[0].identity, farm)
    assert link.confidence == pytest.approx(0.9)
    assert third.explanation.scope == pb.SCOPE_BROWSER
    assert back[3].identity == farm

    seed = secrets.token_hex(4)
    calm = (await replay_verdicts(guard, 3, _farm_session_then_return(seed, farmed=False)))[-7:]
    assert all(v.verdict == pb.VERDICT_ALLOW for v in calm[:3])
    assert [v.verdict for v in calm[3:]] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY]
    assert calm[3].identity != calm[0].identity
    assert all(pb.LINK_KIND_FARM_RETURN not in kinds(v) for v in calm)


async def test_a_farm_back_within_the_hour_on_a_rare_match_is_joined_at_its_second_account(
    any_server: RunningServer,
) -> None:
    """An hour after its session, from another network, the updated browser
    is still too far from the farm for a drift link, but few strangers
    could have shown the farm's set-up within that hour: a second account
    in its first hour is evidence enough (IdentityBook.farm_return_joinable),
    where three days on it takes a third (test above). A browser that never
    farmed keeps its three accounts."""
    guard = await guard_client(any_server)
    events = _farm_session_then_return(secrets.token_hex(4), farmed=True, after=HOUR)
    verdicts = await replay_verdicts(guard, 3, events)
    session, back = verdicts[-9:-4], verdicts[-4:]
    farm = session[0].identity
    assert not back[0].explanation.links
    assert back[0].identity != farm
    assert [v.verdict for v in back] == [pb.VERDICT_ALLOW] + [pb.VERDICT_DENY] * 3
    assert {v.identity for v in back[1:]} == {farm}
    [link] = [link for link in back[1].explanation.links if link.kind == pb.LINK_KIND_FARM_RETURN]
    assert (getattr(link, "from"), link.to) == (back[0].identity, farm)

    events = _farm_session_then_return(secrets.token_hex(4), farmed=False, after=HOUR)
    calm = (await replay_verdicts(guard, 3, events))[-7:]
    assert [v.verdict for v in calm[3:]] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY]
    assert all(pb.LINK_KIND_FARM_RETURN not in kinds(v) for v in calm)


async def test_a_farm_back_is_joined_though_a_stranger_showed_its_set_up_too(
    any_server: RunningServer,
) -> None:
    """Someone else with the farm's set-up signed up the day before it came
    back: the returning browser could have drifted from either. The one
    refused for farming is the farm; the stranger keeps their account and
    is joined to nobody."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    events = _farm_session_then_return(seed, farmed=True, stranger=True)
    verdicts = await replay_verdicts(guard, 3, events)
    session, someone, back = verdicts[-10:-5], verdicts[-5], verdicts[-4:]
    farm = session[0].identity
    assert someone.verdict == pb.VERDICT_ALLOW
    assert someone.identity not in (farm, back[0].identity)
    assert [v.verdict for v in back] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY] * 2
    assert back[2].identity == farm
    [link] = [link for link in back[2].explanation.links if link.kind == pb.LINK_KIND_FARM_RETURN]
    assert (getattr(link, "from"), link.to) == (back[0].identity, farm)


def _farm_back_home(
    seed: str, farmed: bool, back_home: bool, device: dict[str, str] | None = None
) -> list[pb.BacktestEvent]:
    """A farm on a desktop signs up from its home network (five accounts,
    refused beyond the limit: marked farmed; or three: never refused), and
    three weeks later comes back with nothing of its set-up left to match:
    its browser updated, another window size, another language, a third
    of its fonts changed. It signs up every minute, from the same home
    (`back_home`) or from one it never used; with `device`, it is another
    device (someone else at that home)."""
    home = fresh_network()
    now = T0 + 1200 * 50
    fonts = [f"Font {seed} {i}" for i in range(30)]
    first = [
        timed_event(now + 60 * i, f"s{i}", desktop(seed, browser_version="131.0.88"), home)
        for i in range(5 if farmed else 3)
    ]
    changed = desktop(
        seed,
        browser_version="131.0.97",
        screen_width=1600,
        screen_height=900,
        languages=["pt-BR", "pt"],
        fonts=fonts[10:] + [f"Other Font {seed} {i}" for i in range(10)],
        **(device or {}),
    )
    back = now + 21 * 24 * HOUR
    where = home if back_home else fresh_network()
    later = [timed_event(back + 60 * i, f"r{i}", changed, where) for i in range(4)]
    return _background(1200, T0) + first + later


async def test_a_farm_back_on_its_home_network_with_nothing_alike_is_joined_at_its_third_account(
    any_server: RunningServer,
) -> None:
    """Three weeks on, a farm's browser shares no band with what it was
    (four groups changed). What it shares is its home: a network where few
    browsers are seen (no carrier's address), last used by a browser of
    the same device that was refused for farming. A new browser there
    signing up its third account within its first hour is that farm back
    (IdentityBook.farm_return_candidates): the third is refused, counted
    with the farm's. From another network, at home after a session that
    was never refused, or on another device at that home, it keeps its
    three accounts."""
    guard = await guard_client(any_server)
    events = _farm_back_home(secrets.token_hex(4), farmed=True, back_home=True)
    verdicts = await replay_verdicts(guard, 3, events)
    session, back = verdicts[-9:-4], verdicts[-4:]
    farm = session[0].identity
    assert [v.verdict for v in session] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 2
    assert back[0].identity != farm
    assert not back[0].explanation.links
    assert [v.verdict for v in back] == [pb.VERDICT_ALLOW] * 2 + [pb.VERDICT_DENY] * 2
    [link] = [link for link in back[2].explanation.links if link.kind == pb.LINK_KIND_FARM_RETURN]
    assert (getattr(link, "from"), link.to) == (back[0].identity, farm)
    assert back[2].explanation.scope == pb.SCOPE_BROWSER

    windows = {"os_name": "Windows", "platform": "Win32"}
    calm_cases = [(True, False, None), (False, True, None), (True, True, windows)]
    for farmed, back_home, device in calm_cases:
        events = _farm_back_home(secrets.token_hex(4), farmed, back_home, device)
        calm = (await replay_verdicts(guard, 3, events))[-4:]
        assert [v.verdict for v in calm] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY]
        assert all(pb.LINK_KIND_FARM_RETURN not in kinds(v) for v in calm)


async def test_a_fresh_book_joins_no_farm_return_before_it_knows_what_is_rare(
    any_server: RunningServer,
) -> None:
    """A new deployment: the book has seen nobody yet, so every identity is
    young and none is popular. The owners of a phone everyone uses come
    minutes apart from networks of their own, as a farm rotating them
    does: the fourth and fifth are refused as one browser (a fresh book's
    known cost: it cannot tell them apart yet), which marks it farmed.
    Owners of another model of that phone, which differs only by its
    screen, then sign up too: their new identity registering its third
    account within its first hour is no farm coming back, and nothing
    joins it to the first before the book has seen 500 fingerprints."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    phone = iphone(seed, languages=["ja-JP", "ja"], timezone="Asia/Tokyo")
    one = fingerprint(seed, screen_width=390, screen_height=844, **phone)
    other = fingerprint(seed, screen_width=430, screen_height=932, **phone)
    events = [timed_event(T0 + 60 * i, f"a{i}", one, fresh_network()) for i in range(5)]
    events += [timed_event(T0 + 600 + 120 * i, f"b{i}", other, fresh_network()) for i in range(3)]
    verdicts = await replay_verdicts(guard, 3, events)
    first, second = verdicts[:5], verdicts[5:]
    assert [v.verdict for v in first] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 2
    assert all(v.verdict == pb.VERDICT_ALLOW for v in second)
    assert {v.identity for v in second} == {second[0].identity} != {first[0].identity}
    assert all(pb.LINK_KIND_FARM_RETURN not in kinds(v) for v in second)


OWNERS = 200


async def test_a_fresh_book_counts_a_shared_fingerprint_per_network_for_a_day(
    any_server: RunningServer,
) -> None:
    """A new deployment's first hour: two hundred owners of one phone model
    sign up from networks of their own, half with its commonest language
    and another window size, half with its commonest window size and
    another language. Then five owners of its commonest set-up come,
    25 minutes apart. Strangers may show that set-up exactly
    (fingerprint_sharers), and the book has not had the hours popularity
    takes to show: each is counted on its own network, and all five are
    allowed. A day later the book is no longer fresh: six more owners in
    the same rhythm are one browser rotating networks (the set-up is not
    popular yet), and the fourth is refused."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    phone = iphone(seed, screen_height=844, timezone="Europe/Paris")
    common = fingerprint(seed, screen_width=390, languages=["fr-FR", "fr"], **phone)
    owners = [fingerprint(seed, screen_width=400 + i, languages=["fr-FR", "fr"], **phone)
              for i in range(OWNERS // 2)]  # fmt: skip
    owners += [
        fingerprint(seed, screen_width=390, languages=[f"x{i}"], **phone)
        for i in range(OWNERS // 2)
    ]
    events = [timed_event(T0 + 10 * i, f"o{i}", c, fresh_network()) for i, c in enumerate(owners)]
    for day, count in ((0, 5), (1, 6)):
        start = T0 + 3600 + day * 24 * 3600
        events += [
            timed_event(start + 1500 * i, f"c{day}-{i}", common, fresh_network())
            for i in range(count)
        ]
    verdicts = await replay_verdicts(guard, 3, events)
    first_day, day_later = verdicts[OWNERS : OWNERS + 5], verdicts[OWNERS + 5 :]
    assert [v.verdict for v in first_day] == [pb.VERDICT_ALLOW] * 5
    fourth = first_day[3]
    assert signal(fourth, "popularity").value < 3
    assert signal(fourth, "fingerprint_sharers").fired
    assert signal(fourth, "book_age_hours").fired
    assert signal(fourth, "book_age_hours").value < 24
    assert [v.verdict for v in day_later] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 3
    refused = day_later[3]
    assert refused.identity == fourth.identity
    assert signal(refused, "popularity").value < 3
    assert signal(refused, "fingerprint_sharers").fired
    assert not signal(refused, "book_age_hours").fired
    assert signal(refused, "book_age_hours").value > 24
    assert (refused.explanation.scope, refused.explanation.scope_count) == (pb.SCOPE_BROWSER, 3)


async def test_a_fresh_book_counts_strangers_among_its_whole_first_day(
    any_server: RunningServer,
) -> None:
    """A new deployment's first half hour brings two thousand browsers,
    fifty of them one phone model in other languages. Nobody shows its
    set-up in French, and few strangers would among so few
    (fingerprint_sharers about 0.3); but at the rate browsers come, the
    day brings several times as many, among whom some would. Five owners
    of that set-up then come 25 minutes apart from networks of their own:
    each is counted on its own network (the first day's rule), where the
    count of the first hours alone took them for one browser rotating
    networks and refused the fourth and fifth."""
    guard = await guard_client(any_server)
    seed = secrets.token_hex(4)
    rng = random.Random(5)
    systems = [("Windows", "Win32"), ("Mac OS", "MacIntel"), ("Linux", "Linux x86_64")]
    events = []
    phone = iphone(seed, screen_width=390, screen_height=844, timezone="Europe/Paris")
    for i in range(2000):
        system, platform = rng.choice(systems)
        languages = rng.choice([["en-US", "en"], ["de-DE"], ["es-ES"]])
        other = (
            # One in forty the phone, in another language and with a
            # font of its own.
            fingerprint(seed, languages=languages, **{**phone, "fonts": [f"Font {i}"]})
            if i % 40 == 0
            else fingerprint(
                f"{seed}-{i}",
                os_name=system,
                platform=platform,
                browser_version=f"13{rng.randrange(3)}.0.{rng.randrange(50)}",
                screen_width=rng.choice([1920, 1366, 1536, 1440, 2560]),
                languages=languages,
            )
        )
        events.append(timed_event(T0 + 0.9 * i, f"b{i}", other, fresh_network()))
    common = fingerprint(seed, languages=["fr-FR", "fr"], **phone)
    events += [
        timed_event(T0 + 3600 + 1500 * i, f"c{i}", common, fresh_network()) for i in range(5)
    ]
    verdicts = (await replay_verdicts(guard, 3, events))[-5:]
    assert [v.verdict for v in verdicts] == [pb.VERDICT_ALLOW] * 5
    fourth = verdicts[3]
    assert not fourth.explanation.links
    assert signal(fourth, "popularity").value < 3
    assert 0 < signal(fourth, "fingerprint_sharers").value < 0.5
    assert signal(fourth, "book_age_hours").fired


async def _book_knowing_what_is_rare(server: RunningServer, guard: GuardClient) -> None:
    """The server's book, which every test shares, holding the
    MIN_POPULATION fingerprints from which it links across networks: other
    people's browsers, each on a network of its own, sign up until it does
    (after most of the suite, it already holds more)."""
    book = guard_of(server).book
    missing = MIN_POPULATION - book.size()
    if missing <= 0:
        return
    service = await new_service(guard, register_limit=3)
    for start in range(0, missing, 50):
        await asyncio.gather(
            *(
                guard.evaluate(service, "register", account(f"p{i}"), browser(), fresh_network())
                for i in range(start, min(missing, start + 50))
            )
        )
    assert book.size() >= MIN_POPULATION


async def _farm_back_live(
    server: RunningServer, guard: GuardClient, service: str
) -> tuple[list[pb.EvaluateResponse], list[pb.EvaluateResponse], pb.FingerprintComponents, str]:
    """Through Evaluate, on a book that knows what is rare: a browser with
    the suite's common set-up (but for a font and its canvas) signs up five
    times at home (the session's verdicts), then, updated, twice from
    another network (those verdicts). Strangers could show what stayed the
    same within the minute, so no drift link is made; each of the two is
    its new identity's account. Returns both, the updated components and
    that network."""
    await _book_knowing_what_is_rare(server, guard)
    seed = secrets.token_hex(4)
    home, elsewhere = fresh_network(), fresh_network()
    first = fingerprint(seed)
    session = [
        await guard.evaluate(service, "register", account(f"s{i}"), first, home) for i in range(5)
    ]
    updated = fingerprint(seed, browser_version="131.0.6778.108")
    back = [
        await guard.evaluate(service, "register", account(f"r{i}"), updated, elsewhere)
        for i in range(2)
    ]
    return session, back, updated, elsewhere


async def test_a_farm_back_from_another_network_is_refused_live(
    any_server: RunningServer,
) -> None:
    """The same through Evaluate: a browser refused for farming on one
    network comes back updated from another and signs up twice, then
    twenty times at once. The third account in its first hour joins it to
    the farm (`farm_return`), none of the twenty gets in, each counts
    against the farm, and the join survives a rebuild of the book from
    SQL."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    session, back, updated, elsewhere = await _farm_back_live(any_server, guard, service)
    assert [v.verdict for v in session] == [pb.VERDICT_ALLOW] * 3 + [pb.VERDICT_DENY] * 2
    assert [v.verdict for v in back] == [pb.VERDICT_ALLOW] * 2
    assert not back[0].explanation.links
    assert back[1].identity == back[0].identity != session[0].identity
    # Its next accounts all at once: one of them joins it, none gets in.
    rush = await asyncio.gather(
        *(
            guard.evaluate(service, "register", account(f"x{i}"), updated, elsewhere)
            for i in range(20)
        )
    )
    assert all(v.verdict == pb.VERDICT_DENY for v in rush)
    assert {v.identity for v in rush} == {session[0].identity}
    assert sum(pb.LINK_KIND_FARM_RETURN in kinds(v) for v in rush) >= 1
    # Recorded like any join: a book rebuilt from SQL (a restart, a
    # replica) joins them too.
    live = guard_of(any_server)
    await live.recorder.flush()
    book = IdentityBook()
    await identity_record.load(live.db, book, time.time())
    assert book.find(back[0].identity) == session[0].identity
    # Its account now counts with the farm's: a fourth network refuses.
    later = await guard.evaluate(service, "register", account("z"), updated, fresh_network())
    assert later.verdict == pb.VERDICT_DENY


async def test_a_browser_an_operator_allowed_is_never_joined_to_a_farm(
    any_server: RunningServer,
) -> None:
    """The returning farm's browser, once an operator allow-lists it, keeps
    its own identity: its third account, which would join it to the farm,
    is allowed as listed instead."""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    _, back, updated, elsewhere = await _farm_back_live(any_server, guard, service)
    await guard.set_policy(
        pb.Policy(service_id=service, allowed_identities=[back[0].identity]),
        only=["allowed_identities"],
    )
    then = await guard.evaluate(service, "register", account("r2"), updated, elsewhere)
    assert then.verdict == pb.VERDICT_ALLOW
    assert pb.LINK_KIND_FARM_RETURN not in kinds(then)
    assert then.identity == back[0].identity
    assert then.reason == pb.VERDICT_REASON_IDENTITY_ALLOW_LISTED
