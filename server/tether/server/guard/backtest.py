"""Replaying history against a policy before switching it on.

A backtest decides each event exactly as Evaluate would (decide.py, the
same Lua script, the same identity book code), on scratch state of its own:
a fresh identity book in memory, and counters under a key scope of its own
(keys.backtest_scope) that are deleted at the end. Live counters, links and
records are neither read nor written. Event times are the clock: windows,
expiries, popularity and velocity run on them, so a month replays in
seconds with the policy's real windows.

On a pipelined Redis connection, up to WINDOW events' scripts are in
flight at once: Redis runs them in the order they were sent, which is the
events' order, so the verdicts are those of a one-by-one replay.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tether.server import errors
from tether.server.counters.connection import KEY_PREFIX
from tether.server.guard import keys, policies
from tether.server.guard.counters import Sent
from tether.server.guard.decide import Checked, Decider, Decision, Prepared, limit_and_life
from tether.server.guard.identities import FARM_RETURN_ACCOUNTS, YOUNG, IdentityBook, Resolution
from tether.server.guard.policies import Policy
from tether.server.guard.service import Action, EvaluateCall, Guard, Validator, Verdict, verdict_of
from tether.server.transport import request_check

WINDOW = 256
MAX_GROUP_BY = 8
MAX_ATTRIBUTES = 16
MAX_ATTRIBUTE = 64
LEGITIMATE, ABUSIVE = "legitimate", "abusive"


class Event(NamedTuple):
    call: EvaluateCall
    # Seconds since the epoch.
    time: float
    label: str
    actor: str
    attributes: dict[str, str]


@dataclass
class Counts:
    events: int = 0
    allowed: int = 0
    refused: int = 0
    legitimate: int = 0
    false_refusals: int = 0
    abusive: int = 0
    excess: int = 0
    caught: int = 0
    false_refusals_within_limit: int = 0


@dataclass
class Summary:
    total: Counts = field(default_factory=Counts)
    # (attribute, value) -> counts
    groups: dict[tuple[str, str], Counts] = field(default_factory=dict)
    rejected: int = 0
    seconds: float = 0.0


@dataclass
class _Actor:
    limit: int
    groups: list[tuple[str, str]]
    accounts: set[bytes] = field(default_factory=set)
    refused: set[bytes] = field(default_factory=set)

    def beyond_limit(self) -> int:
        """How many of its accounts are beyond the limit (none without one)."""
        return max(0, len(self.accounts) - self.limit) if self.limit else 0


def check_start(policy: Policy, group_by: list[str], violations: errors.Violations) -> Policy:
    """The start's policy, checked like SetPolicy's, and its group_by;
    every problem under `start.`."""
    try:
        checked = policies.check(policy)
    except errors.InvalidArgument as exc:
        violations.extend("start", exc.violations)
        checked = policy
    if len(group_by) > MAX_GROUP_BY:
        violations.add("start.group_by", f"at most {MAX_GROUP_BY} attributes")
    for i, name in enumerate(group_by):
        if not 0 < len(name) <= MAX_ATTRIBUTE or not name.isprintable():
            violations.add(f"start.group_by[{i}]", f"1-{MAX_ATTRIBUTE} printable characters")
    violations.raise_if_any()
    return checked


def check_event(message: Any) -> str:
    """What is wrong with a backtest event's own fields, or "". The request
    gets Evaluate's checks (Validator), which refuse a NUL wherever it could
    matter; the interceptor's walk over every text is skipped (servicer)."""
    if not message.HasField("event_time"):
        return "event.event_time: required"
    violations = errors.Violations()
    request_check.check_timestamp(message.event_time, "event.event_time", violations)
    if violations:
        item = violations.items[0]
        return f"{item.field}: {item.description}"
    if len(message.attributes) > MAX_ATTRIBUTES:
        return f"event.attributes: at most {MAX_ATTRIBUTES}"
    for key, value in message.attributes.items():
        if not (0 < len(key) <= MAX_ATTRIBUTE and len(value) <= MAX_ATTRIBUTE):
            return f"event.attributes: keys 1-{MAX_ATTRIBUTE}, values 0-{MAX_ATTRIBUTE} characters"
    if len(message.actor) > 128:
        return "event.actor: at most 128 characters"
    return ""


# How long a run counts as going on after its last event (renewed as events come).
RUNNING_MS = 600_000
# While backtests run, a full collection waits for this many young ones (10
# otherwise).
FULL_COLLECTION_AFTER = 100


class _FewerFullCollections:
    """A replay grows a scratch book of hundreds of thousands of objects
    from nothing. With the start-up heap frozen (app.py), the collector's
    rule (a full collection whenever the heap outside it grew by a quarter)
    walked the whole book about a dozen times per 24,000 events: ~70 us of
    every event's CPU. While any backtest runs, full collections wait for
    FULL_COLLECTION_AFTER young ones instead; young collections, and so the
    pauses live calls see, stay as they were."""

    running = 0
    saved = (0, 0, 0)

    @classmethod
    def start(cls) -> None:
        if cls.running == 0:
            cls.saved = gc.get_threshold()
            young, middle, full = cls.saved
            gc.set_threshold(young, middle, max(full, FULL_COLLECTION_AFTER))
        cls.running += 1

    @classmethod
    def end(cls) -> None:
        cls.running -= 1
        if cls.running == 0:
            gc.set_threshold(*cls.saved)


class _RecentRegistrations:
    """The registrations a run sent per identity, the last few: too few
    admitted within YOUNG for Decider.farm_return to join
    (IdentityBook.farm_return_joinable) means the run's window need not be
    drained to ask the counters. (A run sees every event, so the count is
    never short.)"""

    def __init__(self) -> None:
        # Tuples of the last FARM_RETURN_ACCOUNTS - 1 times (no object per
        # identity for the collector to walk).
        self._times: dict[str, tuple[float, ...]] = {}

    def add(self, identity: str, t: float) -> None:
        kept = FARM_RETURN_ACCOUNTS - 1
        self._times[identity] = (*self._times.get(identity, ())[1 - kept :], t)

    def recent(self, identity: str, t: float) -> int:
        """How many were sent within YOUNG, up to FARM_RETURN_ACCOUNTS - 1."""
        times = self._times.get(identity)
        if not times:
            return 0
        return sum(t - sent <= YOUNG for sent in times)


# An event whose script was sent: (index, action, event, call, resolution,
# arguments, the reply to read or the task reading it).
_InFlight = tuple[
    int, Action, Event, Checked, Resolution, Prepared, "Sent | asyncio.Future[Decision]"
]


class Backtest:
    def __init__(
        self, guard: Guard, policy: Policy, group_by: list[str], *, explained: bool = True
    ) -> None:
        """explained: verdicts carry their explanation (a run that streams
        no verdicts needs none)."""
        self._guard = guard
        self._explained = explained
        self.policy = policy
        self._group_by = group_by
        self.run_id = secrets.token_hex(8)
        self._scope = keys.backtest_scope(self.run_id)
        self._running_key = f"{KEY_PREFIX}:{keys.backtest_running(self.run_id)}"
        self._running_until = 0.0
        # A scratch book that forgets as the live one does.
        book = IdentityBook(guard.book.forget_after, strict_profiles=guard.book.strict_profiles)
        self._decider = Decider(book, guard.counters, guard.bucket_bits, self._scope)
        self._validator = Validator(guard.validator.digester)
        self._keys: set[str] = set()
        self._registrations = _RecentRegistrations()
        self._last_time = float("-inf")
        self._in_flight: list[_InFlight] = []
        # Actors of labelled events: farms (abusive) and people or
        # households (legitimate), whose accounts beyond the limit are
        # rightly refused.
        self._actors: dict[str, _Actor] = {}
        self._people: dict[str, _Actor] = {}
        self._actors_by_label = {ABUSIVE: self._actors, LEGITIMATE: self._people}
        self.summary = Summary()
        self._started = time.perf_counter()
        self._pipelined = guard.counters.pipelined is not None
        self._loaded = False
        self._collecting_less = False

    async def add(self, index: int, event: Event) -> list[tuple[int, Verdict | str]]:
        """Takes one event; returns the verdicts (or error messages) of the
        events that finished, in order."""
        if not self._loaded:
            if not self._collecting_less:
                _FewerFullCollections.start()
                self._collecting_less = True
            # The script must be known before scripts are pipelined, or a
            # NOSCRIPT retry could run out of order.
            await self._guard.counters.load_scripts()
            self._loaded = True
        if time.monotonic() >= self._running_until:
            # Other processes starting meanwhile leave this run's keys alone.
            await self._guard.counters.mark(self._running_key, life_ms=RUNNING_MS)
            self._running_until = time.monotonic() + RUNNING_MS / 3000
        try:
            action, checked = self._check(event)
        except errors.InvalidArgument as exc:
            self.summary.rejected += 1
            return [*await self._drain(), (index, exc.message)]
        decider = self._decider
        resolution = decider.resolve(checked, event.time)
        done: list[tuple[int, Verdict | str]] = []
        now_ms = int(event.time * 1000)
        registered = self._registrations.recent(resolution.identity, event.time)
        candidates = (
            decider.book.farm_return_joinable(
                checked.fingerprint,
                decider.farm_candidates(checked, resolution, event.time),
                registered,
                event.time,
            )
            if registered
            else []
        )
        if candidates:
            # It reads counts: everything sent before must be done.
            done = await self._drain()
            resolution = await decider.farm_return(
                checked, resolution, candidates, event.time, now_ms
            )
        if action is Action.REGISTER:
            self._registrations.add(resolution.identity, event.time)
        if resolution.merged:
            # Moving counts reads keys: everything sent before must be done.
            done += await self._drain()
            self._keys.update(
                await decider.move_counts(
                    resolution.merged,
                    resolution.identity,
                    checked.service_id,
                    checked.room_id,
                    int(event.time * 1000),
                )
            )
        # The arguments come from the book now, before the next event
        # changes it; the script may run a little later, in order.
        prepared = decider.prepare(checked, resolution, self.policy, event.time)
        self._keys.add(prepared.key)
        self._keys.update(keys.spills(prepared.key, prepared.field))
        if self._pipelined:
            # Sent now, in order; read when the window drains. Without a
            # single pipelined connection open, a task per call does the same.
            sent = decider.send(checked, prepared, now_ms)
            pending: Sent | asyncio.Future[Decision] = (
                asyncio.ensure_future(
                    decider.run(checked, resolution, prepared, now_ms, explained=self._explained)
                )
                if sent is None
                else sent
            )
            self._in_flight.append((index, action, event, checked, resolution, prepared, pending))
            if len(self._in_flight) >= WINDOW:
                done += await self._drain(WINDOW // 2)
            return done
        decision = await decider.run(
            checked, resolution, prepared, now_ms, explained=self._explained
        )
        done.append((index, self._finish(action, event, checked, decision)))
        return done

    async def finish(self) -> list[tuple[int, Verdict | str]]:
        done = await self._drain()
        for actor in self._actors.values():
            excess = actor.beyond_limit()
            caught = min(len(actor.refused), excess)
            for counts in self._counts_of(actor.groups):
                counts.excess += excess
                counts.caught += caught
        for person in self._people.values():
            within = len(person.refused) - min(len(person.refused), person.beyond_limit())
            for counts in self._counts_of(person.groups):
                counts.false_refusals_within_limit += within
        self.summary.seconds = time.perf_counter() - self._started
        return done

    async def drop(self) -> None:
        """Deletes the run's keys: every key it counted in or moved counts
        to. (A server that stops mid-run leaves them to the next start of a
        server, which deletes the keys of every backtest not running.)"""
        if self._collecting_less:
            self._collecting_less = False
            _FewerFullCollections.end()
        await self._guard.counters.delete(*self._keys, self._running_key)
        self._keys.clear()

    async def _drain(self, count: int | None = None) -> list[tuple[int, Verdict | str]]:
        """Reads the replies of the oldest `count` events in flight (all by default)."""
        done: list[tuple[int, Verdict | str]] = []
        if count is None:
            in_flight, self._in_flight = self._in_flight, []
        else:
            in_flight, self._in_flight = self._in_flight[:count], self._in_flight[count:]
        for index, action, event, checked, resolution, prepared, pending in in_flight:
            if isinstance(pending, Sent):
                decision = await self._decider.sent(
                    resolution, prepared, pending, explained=self._explained
                )
            else:
                decision = await pending
            done.append((index, self._finish(action, event, checked, decision)))
        return done

    def _check(self, event: Event) -> tuple[Action, Checked]:
        if event.time < self._last_time:
            raise errors.invalid("event.event_time", "events must come in time order")
        call = event.call
        if not call.service_id:
            call = call._replace(service_id=self.policy.service_id)
        elif call.service_id != self.policy.service_id:
            raise errors.invalid("event.request.service_id", "not the policy's service")
        action, _, checked = self._validator.check(call)
        self._last_time = event.time
        return action, checked

    def _finish(
        self, action: Action, event: Event, checked: Checked, decision: Decision
    ) -> Verdict:
        verdict = verdict_of(action, decision)
        refused = not verdict.allowed or verdict.would_deny
        groups = [
            (name, event.attributes[name]) for name in self._group_by if name in event.attributes
        ]
        for counts in self._counts_of(groups):
            counts.events += 1
            counts.allowed += not refused
            counts.refused += refused
            if event.label == LEGITIMATE:
                counts.legitimate += 1
                counts.false_refusals += refused
                if refused and not event.actor:
                    # An actor of its own, refused its first account.
                    counts.false_refusals_within_limit += 1
            elif event.label == ABUSIVE:
                counts.abusive += 1
        actors = self._actors_by_label.get(event.label)
        if actors is not None and event.actor:
            actor = actors.get(event.actor)
            if actor is None:
                limit, _ = limit_and_life(self.policy, action.value)
                actor = actors[event.actor] = _Actor(limit, groups)
            actor.accounts.add(checked.member)
            if refused:
                actor.refused.add(checked.member)
        return verdict

    def _counts_of(self, groups: list[tuple[str, str]]) -> list[Counts]:
        found = [self.summary.total]
        known = self.summary.groups
        for group in groups:
            counts = known.get(group)
            if counts is None:
                counts = known[group] = Counts()
            found.append(counts)
        return found
