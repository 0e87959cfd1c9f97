"""The one way a call is decided, live or in a backtest: resolve the
fingerprint's identity (identities.py), compute the counting rules' inputs
(rules.py), run the counting script (counters.py), and explain.

The live service and a backtest each hold a Decider of their own: the live
one over the process's identity book and the live keys, a backtest's over a
fresh book and keys under its own scope, with event times for the clock.
"""

from __future__ import annotations

from typing import NamedTuple

from tether.server.guard import keys, rules
from tether.server.guard.counters import (
    Count,
    Evaluation,
    GuardCounters,
    Scope,
    Sent,
    evaluation,
)
from tether.server.guard.fingerprint import Fingerprint, remember
from tether.server.guard.identities import (
    FRESH_BOOK,
    POPULAR_EPISODES,
    SHARED_STRANGERS,
    YOUNG,
    IdentityBook,
    Link,
    Resolution,
)
from tether.server.guard.policies import Policy
from tether.server.guard.signals import HOUR

ACTIONS = ("register", "login", "collaborate")
# Explanations kept (and their messages, convert.py): the returning browsers
# of the last while, at about a kilobyte each.
EXPLANATIONS_KEPT = 10_000
# Young identities farm_return remembers having asked about.
FARMS_ASKED_KEPT = 10_000
_VELOCITY_NAMES = ("velocity_10m", "velocity_1h", "velocity_6h", "velocity_24h")


class Signal(NamedTuple):
    name: str
    value: float
    threshold: float = 0.0
    fired: bool = False


class Explanation(NamedTuple):
    """Why a verdict is what it is (tether.guard.v1.Explanation). A value:
    a returning browser's calls repeat theirs, and its message is kept."""

    fingerprint: str
    links: tuple[Link, ...] = ()
    # "browser", "network", "velocity" or "" (nothing counted).
    scope: str = ""
    scope_count: int = 0
    scope_threshold: int = 0
    signals: tuple[Signal, ...] = ()
    risk: float = 0.0


class Checked(NamedTuple):
    """A validated call, reduced to what deciding needs."""

    service_id: str
    action: str
    room_id: str
    member: bytes
    fingerprint: Fingerprint
    # The client's network, as a keyed digest (16 hex characters).
    network: str


class Prepared(NamedTuple):
    key: str
    # The identity's (and room's) field in the key's hash.
    field: bytes
    limit: int
    life_ms: int
    shadow: bool
    inputs: rules.Inputs


class Decision(NamedTuple):
    resolution: Resolution
    # (NamedTuple keeps `count` for tuple.count.)
    counted: Count
    limit: int
    # None when not asked for (a backtest that streams no verdicts).
    explanation: Explanation | None
    key: str
    field: bytes


def limit_and_life(policy: Policy, action: str) -> tuple[int, int]:
    """(limit, lifetime in seconds; 0: forever) of an action."""
    if action == "register":
        return policy.register_limit, policy.register_window_seconds
    if action == "login":
        return policy.login_limit, policy.login_session_seconds
    return policy.collaborate_limit, policy.room_membership_seconds


class Decider:
    def __init__(
        self, book: IdentityBook, counters: GuardCounters, bucket_bits: int, scope: str = "g"
    ) -> None:
        self.book = book
        self.counters = counters
        self.bucket_bits = bucket_bits
        self.scope = scope
        # Explanations by what they are made of: a returning browser's
        # calls repeat theirs.
        self._explanations: dict[tuple[object, ...], Explanation] = {}
        # Young identities whose farm candidates were asked and found not
        # farmed, with those candidates (farm_return).
        self._farms_asked: dict[tuple[str, str], tuple[str, ...]] = {}

    def key(self, service_id: str, action: str, room_id: str, identity: str) -> str:
        return keys.counted(
            service_id, action, room_id, identity, bits=self.bucket_bits, scope=self.scope
        )

    def resolve(self, call: Checked, t: float) -> Resolution:
        return self.book.resolve(call.fingerprint, call.network, t)

    def farm_candidates(self, call: Checked, resolution: Resolution, t: float) -> list[str]:
        """The identities a registration's identity may be the return of
        (IdentityBook.farm_return_candidates): asked only of a registration
        whose identity was there before this call (a first fingerprint of
        its own has counted nothing yet), and none when the same were
        found not farmed before. Pure: no Redis."""
        if call.action != "register" or (
            resolution.new and resolution.identity == resolution.fingerprint
        ):
            return []
        candidates = self.book.farm_return_candidates(
            call.fingerprint, resolution.identity, call.network, t
        )
        if self._farms_asked.get((call.service_id, resolution.identity)) == tuple(candidates):
            # None of them was farmed a moment ago (a farm's session would
            # ask at every account from the first it may join on).
            return []
        return candidates

    async def farm_return(
        self,
        call: Checked,
        resolution: Resolution,
        candidates: list[str],
        t: float,
        now_ms: int = 0,
    ) -> Resolution:
        """A young identity about to count its FARM_RETURN_ACCOUNTS-th
        registration within YOUNG (or the one before, on a rare match:
        IdentityBook.farm_return_joinable) is joined into the first of
        `candidates` marked farmed on this service: the resolution then
        counts against the farm, with the young identity among those merged
        (its counts move). Otherwise the resolution as it was."""
        young = resolution.identity
        entries, _ = await self.counters.entries(
            self.key(call.service_id, call.action, "", young), keys.field(young, "")
        )
        since = (now_ms or int(t * 1000)) - int(YOUNG * 1000)
        registered = sum(entry.admitted_ms >= since for entry in entries)
        joinable = self.book.farm_return_joinable(call.fingerprint, candidates, registered, t)
        if joinable:
            marks = await self.counters.farmed(
                [
                    (self.key(call.service_id, call.action, "", farm), keys.field(farm, ""))
                    for farm in joinable
                ]
            )
            if self.book.find(young) == young:
                for farm, farmed in zip(joinable, marks, strict=True):
                    joined = self.book.join_return(farm, resolution, t) if farmed else None
                    if joined is not None:
                        return joined
                if len(joinable) == len(candidates):
                    # Every one was asked: none need be again while they stay the same.
                    asked = (call.service_id, young)
                    remember(self._farms_asked, asked, tuple(joinable), FARMS_ASKED_KEPT)
        # A call of the same browser may have joined it while this one
        # waited for Redis: this one counts where that one does.
        return resolution._replace(identity=self.book.find(young))

    def prepare(self, call: Checked, resolution: Resolution, policy: Policy, t: float) -> Prepared:
        """The counting script's arguments for a resolved call, from the
        book as it is now."""
        identity = resolution.identity
        limit, life = limit_and_life(policy, call.action)
        inputs = rules.inputs(
            self.book,
            identity,
            call.network,
            t,
            limit,
            fingerprint=resolution.fingerprint,
            velocity=call.action == "register",
        )
        key = self.key(call.service_id, call.action, call.room_id, identity)
        field = keys.field(identity, call.room_id)
        return Prepared(key, field, limit, life * 1000, policy.shadow, inputs)

    async def run(
        self,
        call: Checked,
        resolution: Resolution,
        prepared: Prepared,
        now_ms: int,
        *,
        explained: bool = True,
    ) -> Decision:
        """Runs the counting script. `now_ms` is its clock (0: Redis's own);
        explained: with the decision's explanation."""
        count = await self.counters.evaluate(_evaluation(call, prepared, now_ms))
        return self._decision(resolution, prepared, count, explained)

    def send(self, call: Checked, prepared: Prepared, now_ms: int) -> Sent | None:
        """run's script sent at once, its reply read by `sent` later (a
        backtest's window, without a task per call); None: use run."""
        return self.counters.send_evaluate(_evaluation(call, prepared, now_ms))

    async def sent(
        self, resolution: Resolution, prepared: Prepared, sent: Sent, *, explained: bool = True
    ) -> Decision:
        """The decision of a call `send` sent, as run's."""
        count = await self.counters.evaluated(sent)
        return self._decision(resolution, prepared, count, explained)

    def _decision(
        self, resolution: Resolution, prepared: Prepared, count: Count, explained: bool
    ) -> Decision:
        explanation = self._explain(resolution, prepared.inputs, count) if explained else None
        return Decision(
            resolution, count, prepared.limit, explanation, prepared.key, prepared.field
        )

    def _explain(self, resolution: Resolution, inputs: rules.Inputs, count: Count) -> Explanation:
        """explain(), kept: the key holds everything it reads."""
        key = (
            resolution.fingerprint,
            resolution.links,
            inputs,
            count.counted,
            count.scope,
            count.threshold,
            count.over,
        )
        known = self._explanations.get(key)
        if known is None:
            known = remember(
                self._explanations, key, explain(resolution, inputs, count), EXPLANATIONS_KEPT
            )
        return known

    async def move_counts(
        self, gone: tuple[str, ...], identity: str, service_id: str, room_id: str, now_ms: int = 0
    ) -> list[str]:
        """Joined identities' counted accounts now count for `identity`:
        this service's registrations and log-ins (and this room's). Returns
        the keys written to."""
        written: list[str] = []
        for other in gone:
            for action in ACTIONS:
                if action == "collaborate" and not room_id:
                    continue
                room = room_id if action == "collaborate" else ""
                source = self.key(service_id, action, room, other)
                source_field = keys.field(other, room)
                entries, farmed = await self.counters.entries(source, source_field)
                if entries or farmed:
                    target = self.key(service_id, action, room, identity)
                    await self.counters.restore(
                        target, keys.field(identity, room), entries, farmed=farmed, now_ms=now_ms
                    )
                    await self.counters.remove_fields([(source, source_field)])
                    written += [target, *keys.spills(target, keys.field(identity, room))]
        return written


def explain(resolution: Resolution, inputs: rules.Inputs, count: Count) -> Explanation:
    signals = [
        Signal(
            "popularity",
            inputs.popularity,
            POPULAR_EPISODES,
            fired=inputs.popularity >= POPULAR_EPISODES,
        ),
        Signal("network_browsers", inputs.crowd_browsers, fired=inputs.crowd),
        Signal("network_share", round(inputs.network_share, 6)),
        Signal("rate_per_hour", round(inputs.rate, 4)),
        Signal(
            "fingerprint_sharers",
            round(inputs.sharers, 4),
            SHARED_STRANGERS,
            fired=inputs.shared,
        ),
        Signal(
            "book_age_hours",
            inputs.book_age_hours,
            FRESH_BOOK / HOUR,
            fired=inputs.fresh_book,
        ),
    ]
    scope = ""
    if count.scope == Scope.BROWSER:
        scope = "browser"
    elif count.scope == Scope.NETWORK:
        scope = "network"
        if inputs.crowd:
            signals.append(Signal("crowd_allowance", inputs.crowd_threshold, fired=count.over))
    elif count.scope == Scope.FARM_BURST:
        # A farmed identity registering again within 10 minutes: every
        # network's accounts count, as a rare browser's.
        scope = "browser"
        signals.append(Signal("farm_burst_10m", count.counted, count.threshold, fired=count.over))
    elif count.scope >= Scope.VELOCITY:
        scope = "velocity"
        name = _VELOCITY_NAMES[count.scope - Scope.VELOCITY]
        signals.append(Signal(name, count.counted, count.threshold, fired=count.over))
    if resolution.links:
        weakest = min(link.confidence for link in resolution.links)
        signals.append(Signal("link_confidence", round(weakest, 4)))
    risk = 1.0 if count.over else 0.0
    if not count.over and count.threshold > 0:
        risk = min(1.0, count.counted / count.threshold)
    return Explanation(
        fingerprint=resolution.fingerprint,
        links=resolution.links,
        scope=scope,
        scope_count=count.counted,
        scope_threshold=count.threshold,
        signals=tuple(signals),
        risk=round(risk, 4),
    )


def _evaluation(call: Checked, prepared: Prepared, now_ms: int) -> Evaluation:
    """The counting script's call for a prepared call."""
    return evaluation(
        prepared.key,
        prepared.field,
        call.member,
        prepared.limit,
        prepared.life_ms,
        record_over=prepared.shadow,
        extend=call.action != "register",
        now_ms=now_ms,
        network=call.network,
        inputs=prepared.inputs,
    )
