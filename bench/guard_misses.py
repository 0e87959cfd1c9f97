"""Why the guard misses what it misses: the identity book and the counting
rules run in this process over a simulated population (no server, no
Redis: the counting script is mirrored in Python), then every farm's
accounts beyond N that were allowed are listed with how they resolved.

    python -m bench.guard_misses --seed 2 [--limit 3] [--basic] [--detail 20]

A quick look before a change to the rules; bench.guard_quality, through
the real server, is the measure of refusals. Links are the book's alone,
which runs here as in the server, so this is where their precision is
measured: each link and merge, when made, is right if someone presented
fingerprints on both sides (a person, a household or a farm), beside the
mean confidence it claimed.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from bench import guard_quality
from bench.guard_population import STRATEGIES, Event, Population, check_strategies
from tether.server.guard import fingerprint, rules
from tether.server.guard.identities import (
    JOINING,
    YOUNG,
    IdentityBook,
    Resolution,
)
from tether.server.shared.digests import Digester, DigestKey

ROTATION_MS = rules.ROTATION_WINDOW * 1000
SESSION_GAP = 2 * 3600.0


@dataclass
class _Key:
    accounts: dict[str, tuple[float, str]] = field(default_factory=dict)
    farmed: bool = False
    registered: list[float] = field(default_factory=list)


class Counting:
    """The EVALUATE script's register path, in Python (forever window)."""

    def __init__(self) -> None:
        self.keys: dict[str, _Key] = defaultdict(_Key)

    def move(self, gone: str, identity: str) -> None:
        source = self.keys.pop(gone, None)
        if source is None:
            return
        target = self.keys[identity]
        target.farmed |= source.farmed
        for member, entry in source.accounts.items():
            if member not in target.accounts:
                target.accounts[member] = entry
                target.registered.append(entry[0])
        target.registered.sort()

    def evaluate(
        self, identity: str, member: str, limit: int, now: float, network: str, i: rules.Inputs
    ) -> tuple[bool, str]:
        key = self.keys[identity]
        if member in key.accounts:
            return True, "already"
        decided = ""
        if i.rare:
            same = sum(
                1
                for admitted, n in key.accounts.values()
                # A farmed mark counts every network, unless strangers
                # share the fingerprint.
                if (key.farmed and not i.shared)
                or n == network
                or (now - admitted) * 1000 < i.rotation_ms
            )
            if same >= limit:
                decided = "browser"
                key.farmed = True
        else:
            here = sum(
                1
                for admitted, n in key.accounts.values()
                if n == network and (not i.crowd or (now - admitted) * 1000 < i.crowd_window_ms)
            )
            if here >= (i.crowd_threshold if i.crowd else limit):
                decided = "network"
        if not decided:
            for window, threshold in zip(rules.VELOCITY_WINDOWS, i.velocity, strict=True):
                if threshold > 0:
                    recent = sum(1 for a in key.registered if now - a < window)
                    if recent >= threshold:
                        decided = f"velocity{int(window)}"
                        break
        if not decided and key.farmed and i.farm_burst and len(key.accounts) >= limit:
            # In its burst, every network's accounts count (a forever window).
            burst = rules.VELOCITY_WINDOWS[0]
            if sum(1 for a in key.registered if now - a < burst) >= i.farm_burst:
                decided = "farm_burst"
        if decided:
            return False, decided
        key.accounts[member] = (now, network)
        key.registered = [a for a in key.registered if now - a < 86400] + [now]
        return True, ""


@dataclass
class Row:
    event: Event
    allowed: bool
    why: str
    resolution: Resolution
    inputs: rules.Inputs
    network: str


def replay(events: list[Event], limit: int, *, strict_profiles: bool = False) -> list[Row]:
    digester = Digester([DigestKey("k1", secrets.token_bytes(32))])
    book = IdentityBook(strict_profiles=strict_profiles)
    counting = Counting()
    networks: dict[str, str] = {}
    rows = []
    for event in events:
        c = dict(event.components)
        comps = fingerprint.Components(**{k: v for k, v in c.items()})
        fp = fingerprint.fingerprint_of(digester, comps)
        net = networks.get(event.client_ip)
        if net is None:
            net = digester.digest("guard-network", fingerprint.network(event.client_ip))[:8].hex()
            networks[event.client_ip] = net
        res = book.resolve(fp, net, event.time)
        if not (res.new and res.identity == res.fingerprint):
            res = _farm_return(book, counting, res, fp, net, event.time)
        for gone in res.merged:
            counting.move(gone, res.identity)
        inputs = rules.inputs(
            book, res.identity, net, event.time, limit, fingerprint=res.fingerprint, velocity=True
        )
        ok, why = counting.evaluate(res.identity, event.account, limit, event.time, net, inputs)
        rows.append(Row(event, ok, why, res, inputs, net))
    return rows


def _farm_return(
    book: IdentityBook,
    counting: Counting,
    res: Resolution,
    fp: fingerprint.Fingerprint,
    network: str,
    t: float,
) -> Resolution:
    """Decider.farm_return, on the mirror's counts."""
    candidates = book.farm_return_candidates(fp, res.identity, network, t)
    if not candidates:
        return res
    young = counting.keys.get(res.identity)
    recent = sum(a >= t - YOUNG for a, _ in young.accounts.values()) if young else 0
    for farm in book.farm_return_joinable(fp, candidates, recent, t):
        key = counting.keys.get(farm)
        if key is not None and key.farmed and (joined := book.join_return(farm, res, t)):
            return joined
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[2])
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument(
        "--farmers", type=int, default=0, help="default: as many per person as the generator's"
    )
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--basic", action="store_true")
    parser.add_argument(
        "--strict-profile-links",
        action="store_true",
        help="as TETHER_GUARD_STRICT_PROFILE_LINKS: profile links judged by device shares too",
    )
    parser.add_argument(
        "--brief", action="store_true", help="each seed's figures, then their mean; no why"
    )
    parser.add_argument("--detail", type=int, default=0, help="farms to list in detail")
    parser.add_argument("--strategy", default="", help="only list farms of this strategy")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        help="the farmers' strategies (tricks may be joined with '+': resize+ip_proxy)",
    )
    args = parser.parse_args()
    try:
        check_strategies(tuple(args.strategies))
    except ValueError as exc:
        parser.error(str(exc))
    figures: list[tuple[float, float]] = []
    for seed in args.seed:
        # As many farmers and households per person as the generator's defaults.
        default = Population(seed)
        scale = args.people / default.people
        farmers = args.farmers or max(1, round(default.farmers * scale))
        households = round(default.households * scale)
        events = Population(
            seed,
            people=args.people,
            farmers=farmers,
            households=households,
            days=args.days,
            strategies=tuple(args.strategies),
        ).events()
        if args.basic:
            for event in events:
                event.components.pop("extra", None)
        began = time.perf_counter()
        rows = replay(events, args.limit, strict_profiles=args.strict_profile_links)
        result = guard_quality.score([r.event for r in rows], (r.allowed for r in rows), args.limit)
        # The default strategies' names cut to fit a line; others whole.
        per = " ".join(
            f"{s[:8] if s in STRATEGIES else s}={result['strategies'][s] * 100:.0f}"
            for s in dict.fromkeys(args.strategies)
        )
        print(
            f"seed {seed}: FR {result['false_refusal'] * 100:.2f}% "
            f"catch {result['catch'] * 100:.1f}% {per} ({time.perf_counter() - began:.0f} s)"
        )
        figures.append((result["false_refusal"], result["catch"]))
        if args.brief:
            continue
        print("  links, right of made (mean confidence claimed):", ", ".join(
            f"{kind} {right}/{made} ({confidence:.3f})"
            for kind, (right, made, confidence) in sorted(link_precision(rows).items())
        ))  # fmt: skip
        # Legitimate refusals, by why (but an actor's beyond its accounts
        # over N: a household is one browser).
        refused = false_refusals(rows, args.limit)
        print("  false refusals:", dict(Counter((r.why, r.event.strategy) for r in refused)))
        print("  misses (accounts beyond N allowed), by why:")
        for (strategy, why), n in sorted(classify(rows, args.limit).items()):
            print(f"    {strategy:<15} {why:<40} {n}")
        shown = 0
        farms: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            if row.event.label != "legitimate":
                farms[row.event.actor].append(row)
        for actor, farm in farms.items():
            strategy = farm[0].event.strategy
            if args.strategy and strategy != args.strategy:
                continue
            excess = max(0, len(farm) - args.limit)
            caught = sum(not r.allowed for r in farm)
            if caught >= excess or shown >= args.detail:
                continue
            shown += 1
            identities = Counter(r.resolution.identity for r in farm)
            print(
                f"  {actor} {strategy}: {len(farm)} accounts, caught {caught}/{excess}, "
                f"{len(identities)} identities"
            )
            start = farm[0].event.time
            print(f"    starts day {(start - events[0].time) / 86400:.1f}")
            for r in farm:
                links = ",".join(
                    f"{link.kind}:{'/'.join(link.changed)}" for link in r.resolution.links
                )
                print(
                    f"    {(r.event.time - start) / 3600:7.2f}h {r.resolution.identity[:6]} "
                    f"{'new' if r.resolution.new else 'old'} net={r.network[:4]} "
                    f"{'ok ' if r.allowed else 'NO '}{r.why:<12} rare={int(r.inputs.rare)} "
                    f"pop={r.inputs.popularity} crowd={r.inputs.crowd_browsers} "
                    f"vel={r.inputs.velocity} {links}"
                )
    if len(figures) > 1:
        refusals = [fr * 100 for fr, _ in figures]
        mean_catch = statistics.fmean(catch for _, catch in figures) * 100
        print(
            f"mean of {len(figures)} seeds: FR {statistics.fmean(refusals):.2f}%"
            f" (worst {max(refusals):.2f}%), catch {mean_catch:.1f}%"
        )


def false_refusals(rows: list[Row], limit: int) -> list[Row]:
    """Legitimate registrations refused, as guard_quality.score counts them:
    of each actor's refusals, as many as it has accounts beyond N are right
    (taken from its last)."""
    by_actor: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row.event.label == "legitimate":
            by_actor[row.event.actor].append(row)
    found = []
    for own in by_actor.values():
        refused = [r for r in own if not r.allowed]
        right = min(len(refused), max(0, len(own) - limit))
        found += refused[: len(refused) - right]
    return found


def link_precision(rows: list[Row]) -> dict[str, tuple[int, int, float]]:
    """Per link kind: links right, links made, and their mean confidence.
    A link is right if whoever presented its fingerprint (a merge: any of
    the joined identity's fingerprints) presented one of the identity it
    joined before."""
    actors: dict[str, set[str]] = defaultdict(set)  # fingerprint -> who presented it
    members: dict[str, set[str]] = defaultdict(set)  # identity -> its fingerprints seen
    judged: set[tuple[str, str, str, float]] = set()
    right: Counter[str] = Counter()
    made: Counter[str] = Counter()
    confidence: dict[str, float] = defaultdict(float)

    def presenters(fingerprints: Iterable[str], besides: str = "") -> set[str]:
        return {a for f in fingerprints if f != besides for a in actors[f]}

    for row in rows:
        resolution = row.resolution
        fingerprint = resolution.fingerprint
        actors[fingerprint].add(row.event.actor)
        for link in resolution.links:
            key = (link.kind, link.source, link.target, link.time)
            if key in judged:
                continue
            judged.add(key)
            # A join's source is an identity: any of its fingerprints.
            near = presenters(members[link.source]) if link.kind in JOINING else actors[link.source]
            far = presenters(members[link.target], besides=link.source)
            made[link.kind] += 1
            right[link.kind] += bool(near & far)
            confidence[link.kind] += link.confidence
        members[resolution.identity].add(fingerprint)
        for gone in resolution.merged:
            members[resolution.identity] |= members.pop(gone, set())
    return {kind: (right[kind], n, confidence[kind] / n) for kind, n in made.items()}


def classify(rows: list[Row], limit: int) -> Counter[tuple[str, str]]:
    """Each farm's allowed accounts beyond its first N, by why they got in:
    the identity is one the farm's earlier sessions never used (a session
    more than SESSION_GAP after the last), a second identity within one
    session, popular (counted per network), or one of its earlier identities
    that did not count (rare and not yet refused)."""
    out: Counter[tuple[str, str]] = Counter()
    farms: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row.event.label != "legitimate":
            farms[row.event.actor].append(row)
    for farm in farms.values():
        allowed = 0
        before: set[str] = set()  # identities of earlier sessions
        this: set[str] = set()
        last = farm[0].event.time
        first_session = True
        for r in farm:
            if r.event.time - last > SESSION_GAP:
                before |= this
                this = set()
                first_session = False
            last = r.event.time
            ident = r.resolution.identity
            if r.allowed:
                allowed += 1
                if allowed > limit:
                    if not r.inputs.rare:
                        why = "popular"
                    elif ident in before:
                        why = "earlier identity, not counted"
                    elif first_session:
                        why = "another identity, first session"
                    elif this and ident not in this:
                        why = "another identity in a later session"
                    else:
                        why = "later session's new identity"
                    out[(r.event.strategy, why)] += 1
            this.add(ident)
    return out


if __name__ == "__main__":
    main()
