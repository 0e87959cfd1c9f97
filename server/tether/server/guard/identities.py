"""Which browser is behind a fingerprint: the guard's identity book.

Every fingerprint belongs to one identity (the browser the guard counts
accounts against). A fingerprint first seen starts an identity of its own,
unless the evidence ties it to one seen before:

- **drift**: it differs from a recent fingerprint in one or two groups of
  components (version, screen, language, software; updates never go
  backwards and may re-render, so version and software count as one; font
  sets stay alike), and so few other people could match what stayed the
  same, given how often that part is seen, that the expected number of
  strangers is below a bound. On the same home network
  the bound is generous; from another network only a short time later
  (IP rotation) it is strict, unless several fingerprints came through in
  a burst, each from a network of its own and one group apart (a farm
  resizing its window behind a new proxy for every account): strangers
  would all have had to arrive so close together. When nothing else
  links, such a burst on the device alone does (a farm drawing every
  drifting group anew for each account).
- **profile**: several groups changed at once, but each new value is one
  this identity showed in the last hours (an anti-detect browser cycling
  its window sizes and languages, fonts with noise), and few strangers of
  that device could match them all; fewer still than the new browsers that
  start cycling so, when the identity never changed before.
- **merge**: a fingerprint justified by two identities that both still
  look like one person joins them; so does a young identity that already
  drifts on its own network (as few new browsers do) with an older one it
  matches, the more readily if that one cycled the same way when young (a
  browser back after an update: the return of a farm).
- **farm return**: a young identity about to count its third registration
  within its first hour joins an older identity marked farmed that it
  could have drifted from, or that was last seen on the same device on
  this network when few browsers use it (the book names the candidates; the counters,
  which hold the registrations and the marks, decide: Decider.farm_return).

Linking never joins identities that look like many people (a popular
phone model with default settings): their matches prove nothing. How many
people an identity looks like is its popularity: the separate episodes in
which it appeared on networks new to it (signals.Spread).

The book is memory: the live service keeps one per process, rebuilt from
SQL at start and kept in step with the other processes' records
(book_follower); a backtest makes a fresh one. Nothing here does I/O.
A fingerprint not seen for `forget_after` leaves it but for its name, times
and link, so that it resolves to the same identity if it comes back.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import math
import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

from tether.server.guard.fingerprint import (
    DEVICE,
    DRIFTING,
    GROUP_NAMES,
    SOFTWARE,
    VERSION,
    Fingerprint,
    fonts_alike,
)
from tether.server.guard.forgotten import ForgottenNames
from tether.server.guard.signals import (
    HOUR,
    Crowds,
    Frequencies,
    Occupancy,
    Spread,
    drop_older,
    renew,
)

# --- how the book weighs evidence (docs/guard.md explains each) -------------
# An identity seen in this many separate episodes from new networks is taken
# as shared by several people.
POPULAR_EPISODES = 3
# Expected strangers showing a fingerprint exactly from which it is no
# evidence of one browser: a stranger is then about as likely as not
# (1 - e^-0.5: 39%) to exist. An identity holding such a fingerprint (by
# what other browsers showed) may be many people, and the book joins it to
# no other on its own judgement (IdentityBook.many); a farmed mark on one
# (IdentityBook.sharers, with its prior; in the first day,
# first_day_sharers) does not make every network count (rules.py).
SHARED_STRANGERS = 0.5
# New networks closer together than this are one episode (one browser
# rotating addresses); a carrier-NAT address counts as new after this.
EPISODE_GAP = 30 * 60.0
# In the book's first day, before it has seen a quiet hour, new networks
# that keep coming for this long make another episode (Spread).
FRESH_BOOK = 24 * HOUR
FRESH_EPISODE_LONGEST = 2 * HOUR
CROWD_PERIOD = 6 * HOUR
# A network that carried this many identities in the horizon is a crowd.
CROWD_BROWSERS = 8
HORIZON = 7 * 24 * HOUR
# Links: the expected number of strangers that may match as well.
STRANGERS_SAME_NETWORK = 0.02
STRANGERS_OTHER_NETWORK = 0.002
STRANGERS_PROFILE = 0.001
# The profile estimate treats groups as independent, which they are not;
# this factor keeps it on the safe side. (It was 30 until a browser that
# never changed had to be one that starts cycling: IdentityBook._cycling_prior.)
PROFILE_SAFETY = 10.0
PROFILE_RECENT = 2 * HOUR
PROFILE_MIN_GROUPS = 2
PROFILE_FONT_SETS = 8
# A value that more recent identities of one device showed finds no profile
# candidate (it is common, so it is no evidence of one browser).
PROFILE_HOLDERS = 50
# Two font sets this alike (Jaccard), or with a few fonts apart
# (fingerprint.FONTS_FEW), are one set with noise.
FONTS_ALIKE = 0.8
FONTS_NEAR = 0.85
# A burst: fingerprints one group apart that came through a band from
# other networks within this long. Its strangers are counted at twice the
# band's mean rate, as the busiest hours of a day bring about that.
BURST_WINDOW = HOUR
BURST_PEAK = 2.0
# A burst on a device (every drifting group may differ) needs at least this
# many identities besides the new one: a device pools many more strangers
# than a band, and so a burst it links holds more browsers than a limit of
# 3 admits (fewer could never refuse anyone there).
DEVICE_BURST = 3
# ... among the device's identities seen last, at most this many: a farm
# drowned among more of the device's strangers within the hour is no burst
# (and a busy device costs a first visit no more than a band).
DEVICE_BURST_SCAN = 20
# A farm's return: a young identity that registers its FARM_RETURN_ACCOUNTS-th
# account within YOUNG of its start is farming (a household of that many
# signing up within its first hour is rare), and if it shares a band with an
# identity already marked farmed (refused for exceeding a limit), it is that
# farm back (a later session, after an update, from another network): the
# accounts of both count together. At most FARM_RETURN_SCAN older
# identities are asked, those seen last first. Its confidence is not a
# stranger estimate (it rests on behaviour, not on how rare the match is):
# it is fixed below every estimated link's, and docs/guard.md gives how
# often such links were right.
FARM_RETURN_ACCOUNTS = 3
FARM_RETURN_SCAN = 8
# A farm may also come back on its own network with nothing of its set-up
# left to match (a later session after an update, in another window and
# language): the identities of the last NETWORK_LAST_FEW fingerprints seen
# on a network that is no crowd (fewer than CROWD_BROWSERS browsers within
# HORIZON: a home, not a carrier's address), on the same device, are asked
# too. Only from the FARM_RETURN_ACCOUNTS-th account: no stranger estimate
# bounds such a match, only behaviour.
NETWORK_LAST_FEW = 4
FARM_RETURN_CONFIDENCE = 0.9
# ... or its account before that, when the farm it could have drifted from
# is rare enough: a stranger joined wrongly would have to match the farm's
# band (the expected strangers since the farm was last seen) and sign up a
# second account within their first hour, which we take at most one new
# browser in SECOND_ACCOUNT_SHARE does (households of two signing up
# together; about 1 in 100 in bench/guard_population.py). Both together
# are held to the bound of a drift link from another network.
SECOND_ACCOUNT_SHARE = 0.04
FARM_RETURN_RARE = STRANGERS_OTHER_NETWORK / SECOND_ACCOUNT_SHARE
# At most this many groups may differ for a drift link (an update's
# version and rendering counting as one).
MAX_DRIFT_GROUPS = 2
BAND_MEMBERS = 20
# Linking across networks needs to know what is rare: not before the book
# has seen this many fingerprints (a fresh start links on home networks only),
# five times FREQUENCY_WEIGHT: by then a value's share rests on its
# sightings more than on the prior. Until it has seen this many browsers,
# it takes the population to be this big.
MIN_POPULATION = 500
# A share of one network's browsers below this is taken as this.
MIN_NETWORK_SHARE = 1e-4
# An identity that drifts on its network this soon after it started behaves
# like one browser cycling its settings (few new browsers do): a stranger
# matching an older identity would also have to be one of those few.
YOUNG = HOUR
# Value frequencies: a value is taken as this common until `weight`
# sightings say otherwise.
FREQUENCY_WEIGHT = 100.0
FREQUENCY_COMMON = 0.2
# The finest slot of any rate: a fingerprint seen again on the same network
# within one teaches the book nothing new.
REPEAT_SLOT = 600.0
# The current burst is left out of every rate.
RATE_EXCLUDE = HOUR
# A fingerprint not seen for this long is forgotten (by default; the
# setting guard_forget_after_days): longer than anything linking looks back
# on (rates and crowds keep HORIZON, profiles PROFILE_RECENT, and a restart
# restores the sightings of HORIZON only). What counted against its
# identity stays counted (its identity stays).
FORGET_AFTER = 30 * 24 * HOUR
# Fingerprints looked at for forgetting per new one: the book can shed old
# ones several times as fast as it learns new ones, in steps too small to
# show on the evaluation path.
FORGET_STEP = 4
# A new key is taken as rare for a day (counting rules) or for an hour
# (linking: on a fresh start, everything looks common).
COUNT_PRIOR = 24 * HOUR
LINK_PRIOR = HOUR


_K = TypeVar("_K")


def compiled() -> bool:
    """Whether the book runs compiled by mypyc (scripts/build-compiled): it
    was loaded from an extension module, not from source or bytecode."""
    return __file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


class LinkKind:
    DRIFT_SAME_NETWORK: Final = "drift_same_network"
    DRIFT_BURST: Final = "drift_burst"
    PROFILE: Final = "profile"
    MERGE: Final = "merge"
    OPERATOR_MERGE: Final = "operator_merge"
    FARM_RETURN: Final = "farm_return"


# The kinds that join two identities (the others tie a fingerprint to one).
JOINING = frozenset({LinkKind.MERGE, LinkKind.OPERATOR_MERGE, LinkKind.FARM_RETURN})


class Link(NamedTuple):
    """One step from a fingerprint (or identity) to the identity it joined."""

    kind: str
    source: str
    target: str
    confidence: float
    changed: tuple[str, ...]
    time: float


class Resolution(NamedTuple):
    identity: str
    fingerprint: str
    # Links followed from the fingerprint to the identity.
    links: tuple[Link, ...]
    # Whether this call saw the fingerprint first.
    new: bool
    # Identities joined into `identity` by this call (their counts move).
    merged: tuple[str, ...]


# Slots: one per fingerprint, and the drift scan reads many per call.
@dataclass(slots=True)
class _Known:
    fingerprint: Fingerprint
    first_seen: float
    last_seen: float
    last_network: str
    # How it joined its identity; None: it started one.
    link: Link | None = None
    # IdentityBook.sharers, kept until the fingerprint's next sighting that
    # is not a repeat (a returning browser's calls ask it again and again);
    # below 0: not known yet.
    sharers: float = -1.0


class _Forgotten(NamedTuple):
    """What the book keeps of a fingerprint it forgot."""

    first_seen: float
    last_seen: float
    link: Link | None


# A group's value as the book counts it: the group's index as a byte, then
# the value (its 8-byte digest). One bytes key, not a (group, value) tuple:
# its hash is kept, and it is no work for the collector.
_Tagged = bytes
_TAGS = [bytes((group,)) for group in range(len(GROUP_NAMES))]
_DRIFTING_OF = operator.itemgetter(*DRIFTING)


def _tagged(groups: tuple[bytes, ...]) -> tuple[_Tagged, ...]:
    """Each group's value, tagged (in group order)."""
    return tuple([tag + value for tag, value in zip(_TAGS, groups, strict=True)])


class _Profile:
    """What an identity showed recently, group by group, as tagged values
    (the keys the book's shares use). Tuples: most identities show one
    value per group, and a set each cost four times the memory of the
    one-value tuple."""

    __slots__ = ("font_sets", "values")

    def __init__(self) -> None:
        self.values: list[tuple[_Tagged, ...]] = [()] * len(GROUP_NAMES)
        self.font_sets: list[frozenset[int]] = []

    def add(self, fp: Fingerprint, tagged: tuple[_Tagged, ...]) -> None:
        values = self.values
        for group, value in enumerate(tagged):
            held = values[group]
            if value not in held:
                values[group] = (*held, value)
        if fp.fonts not in self.font_sets and len(self.font_sets) < PROFILE_FONT_SETS:
            self.font_sets.append(fp.fonts)

    def absorb(self, other: _Profile) -> None:
        values = self.values
        for group, theirs in enumerate(other.values):
            held = values[group]
            values[group] = held + tuple(v for v in theirs if v not in held)
        for fonts in other.font_sets:
            if fonts not in self.font_sets and len(self.font_sets) < PROFILE_FONT_SETS:
                self.font_sets.append(fonts)


class _Candidate(NamedTuple):
    expected: float
    identity: str
    kind: str
    changed: tuple[str, ...]


# A band: the index of the way groups were left out (in _LEFT_OUT), then
# the kept groups' digests (8 bytes each). Bytes, not a tuple: a bytes key
# keeps its hash, where a tuple's was computed again on every look-up (a
# band is looked up in several dicts per call), and it is no work for the
# collector (two tuples per band were most of what a new fingerprint left
# for young collections to walk).
_Band = bytes
_LEFT_OUT = [
    out for size in range(1, MAX_DRIFT_GROUPS + 1) for out in itertools.combinations(DRIFTING, size)
] + [
    # An update re-renders (canvas, WebGL: software) as it changes the
    # version: that pair counts as one change, with one more group.
    tuple(sorted((VERSION, SOFTWARE, group)))
    for group in DRIFTING
    if group not in (VERSION, SOFTWARE)
]
_KEEP_GROUPS = {out: tuple(g for g in range(len(GROUP_NAMES)) if g not in out) for out in _LEFT_OUT}
# For each way of leaving groups out, its band's first byte and a getter of
# the groups kept.
_KEEP = [(bytes((i,)), operator.itemgetter(*_KEEP_GROUPS[out])) for i, out in enumerate(_LEFT_OUT)]


# For each way of leaving groups out: a getter of the kept groups' shares
# (in group order, as the product is taken), and the names of those left out.
_KEPT_SHARES = {out: operator.itemgetter(*keep) for out, keep in _KEEP_GROUPS.items()}
_CHANGED = {out: tuple(GROUP_NAMES[g] for g in out) for out in _LEFT_OUT}
# A member seen on another network is never taken as closer than this (hours).
_MIN_HOURS = 60.0 / HOUR


def _bands(fp: Fingerprint) -> list[_Band]:
    """Each way of leaving drifting groups out (one or two, an update's
    version and software counting as one): a fingerprint that differs from
    another only in those groups shares that band."""
    groups = fp.groups
    return [b"".join((way, *keep(groups))) for way, keep in _KEEP]


class IdentityBook:
    def __init__(
        self, forget_after: float = FORGET_AFTER, *, strict_profiles: bool = False
    ) -> None:
        self.forget_after = forget_after
        # Profile links also judged by each value's share among the device's
        # own fingerprints (_device_strangers_share): fewer strangers joined
        # to a farm's identity, fewer of the farm's variants too.
        self.strict_profiles = strict_profiles
        self._known: dict[str, _Known] = {}
        self._parent: dict[str, str] = {}
        self._merges: dict[str, Link] = {}
        # An identity's fingerprints; one alone in its identity has no
        # entry (read as [itself]): most identities, and a list each.
        self._members: dict[str, list[str]] = {}
        self._apart: set[frozenset[str]] = set()
        # Tuples, replaced on change: a tuple of strings is no work for the
        # collector, where a list per band (most of the book's containers)
        # was walked by every full collection.
        self._bands: dict[_Band, tuple[str, ...]] = {}
        # How many fingerprints were last seen on each network: a band
        # needs no look at its members when none can be on this one.
        self._last_on: dict[str, int] = {}
        # ... and the last few of them (NETWORK_LAST_FEW, newest last): who
        # a farm back on its own network could be.
        self._last_few: dict[str, tuple[str, ...]] = {}
        # Bands that held more fingerprints than they keep: who else showed
        # them is no longer known.
        self._crowded_bands: set[_Band] = set()
        self._profiles: dict[str, _Profile] = {}
        # Per device: the identities seen recently, oldest first; and per
        # device and drifting group's value (the device's digest, then the
        # tagged value): those that showed that value.
        self._active: dict[bytes, dict[str, float]] = {}
        self._holders: dict[bytes, dict[str, float]] = {}
        self.band_rates = Occupancy(HOUR, HORIZON, LINK_PRIOR)
        # A device class may be seen many times an hour: finer slots.
        self.device_rates = Occupancy(REPEAT_SLOT, HORIZON, LINK_PRIOR)
        # So may a fingerprint many people share: in hour slots, an hour in
        # which ten of them came weighed as one in which one did, and
        # velocity took its busy hours for a burst. By chunk, for the same
        # reason over a day (Occupancy).
        self.identity_rates = Occupancy(REPEAT_SLOT, HORIZON, COUNT_PRIOR, by_chunk=True)
        self.spread = Spread(EPISODE_GAP, CROWD_PERIOD, FRESH_EPISODE_LONGEST)
        self.crowds = Crowds(HORIZON, CROWD_BROWSERS)
        self._values = Frequencies(FREQUENCY_WEIGHT, FREQUENCY_COMMON)
        # Per device: its fingerprints' values, for shares given the device
        # (a phone model fixes its screen, fonts and rendering).
        self._given_device: dict[bytes, Frequencies] = {}
        # Identities started, and those that drifted within YOUNG of their
        # start (per identity, in which groups; per group, how many): how
        # often a new browser drifts so at once.
        self._started_identities = 0
        self._drifted_young: dict[str, set[int]] = {}
        self._young_drifts = [0] * len(GROUP_NAMES)
        # Under each set's hash: counting a set does not keep it alive once
        # its fingerprints are forgotten.
        self._font_sets = Frequencies(FREQUENCY_WEIGHT, FREQUENCY_COMMON)
        self._started: float | None = None
        # The earliest first sighting of a fingerprint held or restored.
        self._first_known = math.inf
        # Fingerprints held, in the order they came (or last went round):
        # those looked at for forgetting next first.
        self._queue: deque[str] = deque()
        # Forgotten fingerprints that had joined an identity, and the names
        # of those that had started their own (forgotten.py).
        self._forgotten: dict[str, _Forgotten] = {}
        self._forgotten_names = ForgottenNames()

    # --- reading ---------------------------------------------------------
    def find(self, identity: str) -> str:
        """The identity an identity or fingerprint resolves to now."""
        parent = self._parent.get(identity)
        if parent is None:
            return identity
        root = self.find(parent)
        if root != parent:
            self._parent[identity] = root
        return root

    def size(self) -> int:
        """How many fingerprints the book holds (not those it forgot)."""
        return len(self._known)

    def forgotten(self) -> int:
        """How many fingerprints the book forgot (and holds no more)."""
        return len(self._forgotten) + len(self._forgotten_names)

    def forgotten_bytes(self) -> int:
        """What the forgotten names without a link take."""
        return self._forgotten_names.size_in_bytes()

    def holds(self, fingerprint: str) -> bool:
        """Whether the book holds the fingerprint (has not forgotten it)."""
        return fingerprint in self._known

    def knows(self, fingerprint: str) -> bool:
        """Whether the book has seen the fingerprint (held or forgotten);
        about once in 10^6, a fingerprint never seen is taken for one
        forgotten without a link (surely_knows says which)."""
        return (
            fingerprint in self._known
            or fingerprint in self._forgotten
            or fingerprint in self._forgotten_names
        )

    def surely_knows(self, fingerprint: str) -> bool:
        """Whether the book holds the fingerprint, or forgot it with a link:
        what it knows for sure (a name forgotten without one, SQL can tell)."""
        return fingerprint in self._known or fingerprint in self._forgotten

    @property
    def watched_since(self) -> float:
        """The book's first sighting (a restart restores it with the
        sightings of the horizon): rates assume nothing of the time before."""
        return -math.inf if self._started is None else self._started

    @property
    def known_since(self) -> float:
        """When the book first saw any fingerprint it holds or was restored
        with: unlike watched_since, a restart restores it from the record's
        fingerprints (30 days), so a restart after a quiet week does not
        make the book fresh again. -inf before the first."""
        return -math.inf if self._first_known == math.inf else self._first_known

    def fresh(self, t: float) -> bool:
        """Whether the book is in its first day (FRESH_BOOK) at t: too new
        to have seen a quiet hour, or a popular fingerprint's episodes."""
        return t - self.known_since < FRESH_BOOK

    def first_day_sharers(self, fingerprint: str, t: float) -> float:
        """sharers() among the browsers the book's first day brings, at the
        rate it has seen them come so far (at least those it holds): in its
        first hours a fresh book has seen only part of who will show a
        fingerprint that day."""
        held = self._values.total
        if not held:
            return 0.0
        day = self._overall_rate(t) * FRESH_BOOK / HOUR
        return self.sharers(fingerprint) * max(1.0, day / held)

    def popularity(self, identity: str) -> int:
        return self.spread(identity)

    def popular(self, identity: str) -> bool:
        return self.spread(identity) >= POPULAR_EPISODES

    def many(self, identity: str, besides: str = "") -> bool:
        """Whether an identity may be many people: popular, or holding a
        fingerprint strangers share. Joined to another, the strangers who
        show it would count as that one's browser: a phone model's defaults
        merged into a farm in a fresh book's first hours (before any
        popularity shows) refused everyone who owns that phone. The
        fingerprints of `besides` (the identity it would be joined to) are
        no strangers: what they share with it is the very evidence for
        the join."""
        if self.popular(identity):
            return True
        theirs: dict[tuple[bytes, _Tagged], int] = {}
        if besides:
            for name in self._members.get(besides, (besides,)):
                known = self._known.get(name)
                if known is None:
                    continue
                device = known.fingerprint.groups[DEVICE]
                for value in _tagged(known.fingerprint.groups):
                    theirs[device, value] = theirs.get((device, value), 0) + 1
        return any(
            self._shared(member, theirs) for member in self._members.get(identity, (identity,))
        )

    def _shared(self, fingerprint: str, theirs: dict[tuple[bytes, _Tagged], int]) -> bool:
        """Whether SHARED_STRANGERS or more other browsers the book holds
        (but those counted in `theirs`, by device and value) are expected
        to show the fingerprint exactly, by what they showed alone: each
        value's share among the device's other fingerprints, without the
        prior that takes a value seen seldom as common. That prior keeps
        links from resting on thin evidence; here it would make every
        browser of a device seen a few dozen times look shared, and keep a
        farm's new window from ever joining its identities."""
        known = self._known.get(fingerprint)
        if known is None:
            return False
        groups = known.fingerprint.groups
        device = groups[DEVICE]
        given = self._given_device.get(device)
        if given is None:
            return False
        tagged = _tagged(groups)
        others = given.total - 1 - theirs.get((device, tagged[DEVICE]), 0)
        if others < 1:
            return False
        expected = float(others)
        for group in DRIFTING:
            value = tagged[group]
            shown = given.count(value) - 1 - theirs.get((device, value), 0)
            expected *= max(0, shown) / others
        return expected >= SHARED_STRANGERS

    def sharers(self, fingerprint: str) -> float:
        """How many of the browsers the book has seen are expected to show
        exactly this fingerprint besides its own: the device's share times
        each value's share among that device's fingerprints (the estimate
        links rest on). A fingerprint a stranger could show exactly tells
        nothing of who comes back with it."""
        known = self._known.get(fingerprint)
        if known is None:
            return 0.0
        if known.sharers < 0:
            tagged = _tagged(known.fingerprint.groups)
            known.sharers = self._values.total * self._share_given_device(tagged, ())
        return known.sharers

    def crowded(self, network: str, t: float) -> bool:
        return self.crowds.crowded(network, t)

    def members(self, identity: str) -> list[str]:
        return list(self._members.get(self.find(identity), [identity]))

    def link_of(self, fingerprint: str) -> Link | None:
        known = self._known.get(fingerprint) or self._forgotten.get(fingerprint)
        return None if known is None else known.link

    def seen(self, fingerprint: str) -> tuple[float, float] | None:
        known = self._known.get(fingerprint) or self._forgotten.get(fingerprint)
        return None if known is None else (known.first_seen, known.last_seen)

    def merge_link(self, gone: str) -> Link | None:
        """How an identity was joined into another, if it was."""
        return self._merges.get(gone)

    def merges_into(self, identity: str) -> list[Link]:
        root = self.find(identity)
        return [link for gone, link in self._merges.items() if self.find(gone) == root]

    def path(self, fingerprint: str) -> tuple[Link, ...]:
        """The links from a fingerprint to its identity: how it joined,
        then the merges its identity went through."""
        links: list[Link] = []
        link = self.link_of(fingerprint)
        current = fingerprint
        if link is not None:
            links.append(link)
            current = link.target
        seen = {current}
        while current in self._parent:
            merge = self._merges.get(current)
            current = self._parent[current]
            if merge is not None:
                links.append(merge)
            if current in seen:
                break
            seen.add(current)
        return tuple(links)

    # --- the evaluation path -------------------------------------------
    def resolve(self, fp: Fingerprint, network: str, t: float) -> Resolution:
        """The identity of a fingerprint seen now on a network, linking it
        when first seen, and learning from the sighting."""
        if self._started is None:
            self._started = t
            self._first_known = min(self._first_known, t)
        known = self._known.get(fp.identity)
        if known is not None and _repeat(known, network, t):
            # Nothing to learn from a browser seen on this network within
            # the slot: every rate, episode and crowd already counts it.
            known.last_seen = t
            identity = self.find(fp.identity)
            return Resolution(identity, fp.identity, self.path(fp.identity), False, ())
        crowd = self.crowds.crowded(network, t)
        bands = _bands(fp)
        tagged = _tagged(fp.groups)
        merged: tuple[str, ...] = ()
        if known is None and (
            fp.identity in self._forgotten or fp.identity in self._forgotten_names
        ):
            # Back after it was forgotten: its identity as it was, not a new link.
            known = self._recall(fp, bands, tagged, network, t)
        if known is not None:
            identity = self.find(fp.identity)
            new = False
        else:
            identity, merged = self._link(fp, bands, tagged, network=network, t=t, crowd=crowd)
            new = True
            self._forget_some(t)
        self._observe(
            fp, bands, tagged, identity=identity, network=network, t=t, crowd=crowd, new=new
        )
        # The links followed, and the merges this sighting made.
        links = self.path(fp.identity)
        if merged:
            links += tuple(link for gone in merged if (link := self._merges.get(gone)) is not None)
        return Resolution(identity, fp.identity, links, new, merged)

    def _link(
        self,
        fp: Fingerprint,
        bands: list[_Band],
        tagged: tuple[_Tagged, ...],
        *,
        network: str,
        t: float,
        crowd: bool,
    ) -> tuple[str, tuple[str, ...]]:
        candidates = self._drift(fp, bands, tagged, network=network, t=t, crowd=crowd)
        if self._values.total >= MIN_POPULATION:
            candidates += self._profile(fp, tagged, t)
            if not candidates:
                candidates = self._device_burst(fp, tagged, network, t)
        else:
            candidates = [c for c in candidates if c.kind == LinkKind.DRIFT_SAME_NETWORK]
        link: Link | None = None
        identity = fp.identity
        merged: list[str] = []
        if candidates:
            best = min(candidates, key=lambda c: c.expected)
            identity = self.find(best.identity)
            link = Link(
                best.kind, fp.identity, identity, _confidence(best.expected), best.changed, t
            )
            for other in candidates:
                root = self.find(other.identity)
                if (
                    root != identity
                    and not self.many(root, besides=identity)
                    and not self.many(identity, besides=root)
                    and self._join(identity, root, LinkKind.MERGE, _confidence(other.expected), t)
                ):
                    merged.append(root)
            if link.kind == LinkKind.DRIFT_SAME_NETWORK and self._young(identity, t):
                # Counted as the record restores it (which knows no crowd).
                self._drifted_young_in(identity, best.changed)
                if not crowd:
                    merged += self._return(fp, bands, tagged, identity, t)
        else:
            self._started_identities += 1
        self._hold(_Known(fp, t, t, network, link), bands)
        if link is not None:
            self._parent[fp.identity] = identity
            self._members.setdefault(identity, [identity]).append(fp.identity)
        return identity, tuple(merged)

    def _hold(self, known: _Known, bands: list[_Band]) -> None:
        name = known.fingerprint.identity
        self._known[name] = known
        self._queue.append(name)
        self._arrive(name, known.last_network)
        self._add_to_bands(name, bands)

    # --- forgetting ----------------------------------------------------
    def _forget_some(self, t: float) -> None:
        """Looks at the FORGET_STEP fingerprints held longest (or since
        they last went round) and forgets those not seen for forget_after."""
        queue, held = self._queue, self._known
        oldest = t - self.forget_after
        for _ in range(min(FORGET_STEP, len(queue))):
            name = queue.popleft()
            known = held.get(name)
            if known is None:
                continue
            if known.last_seen >= oldest:
                queue.append(name)
            else:
                self._forget(known, t)

    def _forget(self, known: _Known, t: float) -> None:
        """Drops a fingerprint from memory but for its name, times and link
        (its identity is untouched); and its identity's traces, once none of
        its fingerprints is held."""
        fp = known.fingerprint
        name = fp.identity
        del self._known[name]
        if known.link is None:
            self._forgotten_names.add(name)
        else:
            self._forgotten[name] = _Forgotten(known.first_seen, known.last_seen, known.link)
        # Shares among the fingerprints held: its values, and the identity
        # it started, no longer count.
        self._remove_values(fp)
        if known.link is None:
            self._started_identities = max(0, self._started_identities - 1)
        self._leave(name, known.last_network)
        if known.last_network not in self._last_on:
            self.crowds.forget_network(known.last_network, t)
        for band in _bands(fp):
            members = self._bands.get(band)
            if members is None or name not in members:
                continue
            rest = tuple(m for m in members if m != name)
            if rest:
                self._bands[band] = rest
            else:
                del self._bands[band]
                self.band_rates.forget_idle(band, t)
        identity = self.find(name)
        if any(member in self._known for member in self._members.get(identity, [identity])):
            return
        # Nothing of the identity is held: what the book learned of it goes.
        self._profiles.pop(identity, None)
        for group in self._drifted_young.pop(identity, ()):
            self._young_drifts[group] = max(0, self._young_drifts[group] - 1)
        self.spread.forget((identity,))
        self.identity_rates.forget_idle(identity, t)
        self.crowds.forget_idle(identity, t)
        device = fp.groups[DEVICE]
        _drop(self._active, device, identity)
        for value in _DRIFTING_OF(_tagged(fp.groups)):
            _drop(self._holders, device + value, identity)

    def _recall(
        self,
        fp: Fingerprint,
        bands: list[_Band],
        tagged: tuple[_Tagged, ...],
        network: str,
        t: float,
    ) -> _Known:
        """A forgotten fingerprint held again, as it was when forgotten. Of
        one forgotten without a link only the name was kept: it was last
        seen forget_after ago at the latest."""
        was = self._forgotten.pop(fp.identity, None)
        if was is None:
            long_ago = t - self.forget_after
            was = _Forgotten(long_ago, long_ago, None)
        known = _Known(fp, was.first_seen, was.last_seen, network, was.link)
        self._hold(known, bands)
        self._add_values(fp, tagged)
        if was.link is None:
            self._started_identities += 1
        return known

    def _add_to_bands(self, fingerprint: str, bands: list[_Band]) -> None:
        known = self._bands
        # One tuple for every band the fingerprint is alone in (most of a
        # new one's): fewer objects for the collector to walk.
        alone = (fingerprint,)
        for band in bands:
            members = known.get(band)
            if members is None:
                known[band] = alone
            elif len(members) < BAND_MEMBERS:
                known[band] = (*members, fingerprint)
            else:
                known[band] = (*members[1:], fingerprint)
                self._crowded_bands.add(band)

    def _return(
        self,
        fp: Fingerprint,
        bands: list[_Band],
        tagged: tuple[_Tagged, ...],
        identity: str,
        t: float,
    ) -> list[str]:
        """A young identity that drifted on its own network: joined with the
        older identities it is the return of. Returns those joined."""
        if self._values.total < MIN_POPULATION or self.many(identity):
            return []
        merged: list[str] = []
        for other in self._returns(fp, bands, tagged, identity, t):
            root = self.find(other.identity)
            if (
                root != identity
                and not self.many(root, besides=identity)
                and self._join(identity, root, LinkKind.MERGE, _confidence(other.expected), t)
            ):
                merged.append(root)
        return merged

    def _young(self, identity: str, t: float) -> bool:
        """Whether the identity started within YOUNG."""
        known = self._known.get(identity)
        return known is not None and t - known.first_seen <= YOUNG

    def _drifted_young_in(self, identity: str, changed: Iterable[str]) -> None:
        """Counts a young identity among those that drifted in these groups
        (each identity once per group)."""
        groups = self._drifted_young.setdefault(identity, set())
        for name in changed:
            group = GROUP_NAMES.index(name)
            if group not in groups:
                groups.add(group)
                self._young_drifts[group] += 1

    def _cycled(self, identity: str) -> set[int]:
        """The groups an identity (any identity joined into it) drifted in
        while young: how it cycles, if it does."""
        groups: set[int] = set()
        for member in self._members.get(identity, [identity]):
            groups |= self._drifted_young.get(member, set())
        return groups

    def _drift_share(self, groups: Iterable[int]) -> float:
        """The share of new identities that drifted while young in each of
        these groups (at most that of the rarest)."""
        prior = FREQUENCY_WEIGHT * FREQUENCY_COMMON
        drifted = min(self._young_drifts[group] for group in groups)
        return min(1.0, (drifted + prior) / (self._started_identities + FREQUENCY_WEIGHT))

    def _returns(
        self,
        fp: Fingerprint,
        bands: list[_Band],
        tagged: tuple[_Tagged, ...],
        identity: str,
        t: float,
    ) -> list[_Candidate]:
        """Older identities a young, drifting identity is the return of.

        The fingerprint drifted from its identity's first within YOUNG. If
        the older identity drifted in the same group when it was young, a
        stranger who matched it as well would also have to be one of the
        few who drift so at once, so the expected strangers are those
        matching the band times that share; if it never did, the young
        one's drifting is no evidence of being it. A band that only the
        older identity showed was seen at that identity's own rate: its
        strangers come at the rate the values' shares given the device
        give."""
        found: dict[str, _Candidate] = {}
        cycles = self._cycled(identity)
        # The older identities' own cycling, looked up once each, and only
        # for a match that the least share could bring under the bound.
        cycled: dict[str, float] = {}
        least = self._drift_share(cycles)
        overall = self._overall_rate(t)
        shares = self._shares(tagged)
        for band in bands:
            members = self._bands.get(band)
            if not members:
                continue
            out = _LEFT_OUT[band[0]]
            kept = overall * math.prod(p for g, p in enumerate(shares) if g not in out)
            rate = max(self.band_rates.rate(band, t, RATE_EXCLUDE), kept)
            owner = self._owner(band, members, identity)
            own_rate = rate
            if owner is not None:
                own_rate = min(rate, max(kept, overall * self._share_given_device(tagged, out)))
            for member in reversed(members):
                root = self.find(member)
                if root == identity:
                    continue
                earlier = self._known[member]
                hours = max(t - earlier.last_seen, 60.0) / HOUR
                expected = (own_rate if root == owner else rate) * hours
                if expected * least > STRANGERS_OTHER_NETWORK:
                    continue
                # A stranger would also have to be one of the few new
                # browsers that cycle as this one does; the older identity
                # back would, if it cycled so too. (One that never did is
                # no likelier to be this browser than any stranger.)
                share = cycled.get(root)
                if share is None:
                    shared = cycles & self._cycled(root)
                    share = cycled[root] = self._drift_share(shared) if shared else 1.0
                expected *= share
                if expected > STRANGERS_OTHER_NETWORK:
                    continue
                known = found.get(root)
                if known is not None and expected >= known.expected:
                    continue
                if not _can_drift(earlier.fingerprint, fp, out):
                    continue
                changed = tuple(GROUP_NAMES[g] for g in out)
                found[root] = _Candidate(expected, root, LinkKind.MERGE, changed)
        return list(found.values())

    def _owner(self, band: _Band, members: tuple[str, ...], besides: str) -> str | None:
        """The one rare identity that showed the band, leaving `besides`
        out, if the band never held more fingerprints than it keeps."""
        if band in self._crowded_bands:
            return None
        owner: str | None = None
        for member in members:
            root = self.find(member)
            if root == besides:
                continue
            if owner is None:
                owner = root
            elif root != owner:
                return None
        # A popular identity is several people: its visits are strangers'.
        return None if owner is None or self.popular(owner) else owner

    def _add_values(self, fp: Fingerprint, tagged: tuple[_Tagged, ...]) -> None:
        """Counts a fingerprint the book now holds in the shares of its
        values (and of its font set)."""
        self._values.add(tagged)
        device = fp.groups[DEVICE]
        given = self._given_device.get(device)
        if given is None:
            given = self._given_device[device] = Frequencies(FREQUENCY_WEIGHT, FREQUENCY_COMMON)
        given.add(tagged)
        self._font_sets.add([hash(fp.fonts)])

    def _remove_values(self, fp: Fingerprint) -> None:
        """_add_values undone, for a fingerprint the book forgets: shares
        are among the fingerprints held, as a restart restores them, so
        they describe the last `forget_after` and not every browser ever."""
        tagged = _tagged(fp.groups)
        self._values.remove(tagged)
        device = fp.groups[DEVICE]
        given = self._given_device.get(device)
        if given is not None:
            given.remove(tagged)
            if not given.total:
                del self._given_device[device]
        self._font_sets.remove([hash(fp.fonts)])

    def _share_given_device(self, tagged: tuple[_Tagged, ...], out: tuple[int, ...]) -> float:
        """The share of fingerprints with this device and these values in
        the groups not left out, each value's share taken among the
        device's own fingerprints (a phone model fixes its screen, fonts
        and rendering: no independence assumed between them and it)."""
        device = tagged[DEVICE]
        p = self._values.share_of(device)
        given = self._given_device.get(device[1:])
        if given is None:
            return p
        for group in DRIFTING:
            if group not in out:
                p *= given.share_of(tagged[group])
        return p

    def _observe(
        self,
        fp: Fingerprint,
        bands: list[_Band],
        tagged: tuple[_Tagged, ...],
        *,
        identity: str,
        network: str,
        t: float,
        crowd: bool,
        new: bool,
    ) -> None:
        known = self._known[fp.identity]
        known.last_seen = t
        known.sharers = -1.0
        self._move(known, network)
        self.band_rates.see_all(bands, t)
        device = fp.groups[DEVICE]
        _touch(_made(self._active, device), identity, t)
        for value in _DRIFTING_OF(tagged):
            _touch(_made(self._holders, device + value), identity, t)
        profile = self._profiles.get(identity)
        if profile is None:
            profile = self._profiles[identity] = _Profile()
        profile.add(fp, tagged)
        self.device_rates.see(device, t)
        if new:
            # Shares among fingerprints, as the record restores them: a
            # browser that returns often does not make its values common.
            self._add_values(fp, tagged)
        self.spread.see(identity, network, t, crowd, fresh=self.fresh(t))
        self.identity_rates.see(identity, t)
        self.crowds.see(network, identity, t)

    def _move(self, known: _Known, network: str) -> None:
        """A fingerprint last seen on `network` now."""
        before = known.last_network
        if before == network:
            return
        name = known.fingerprint.identity
        self._leave(name, before)
        self._arrive(name, network)
        known.last_network = network

    def _arrive(self, name: str, network: str) -> None:
        """One fingerprint more last seen on `network`."""
        last_on = self._last_on
        last_on[network] = last_on.get(network, 0) + 1
        few = self._last_few.get(network, ())
        self._last_few[network] = (*few[1 - NETWORK_LAST_FEW :], name)

    def _leave(self, name: str, network: str) -> None:
        """One fingerprint fewer last seen on `network`."""
        last_on = self._last_on
        if last_on[network] == 1:
            del last_on[network]
            del self._last_few[network]
            return
        last_on[network] -= 1
        few = self._last_few[network]
        if name in few:
            self._last_few[network] = tuple(other for other in few if other != name)

    def _overall_rate(self, t: float) -> float:
        """New fingerprints per hour: those held, over the time they span
        (since the start, at most forget_after: older ones are forgotten)."""
        started = self._started if self._started is not None else t
        span = min(t - started, self.forget_after) + LINK_PRIOR
        return self._values.total / max(1.0, span / HOUR)

    def _shares(self, tagged: tuple[_Tagged, ...]) -> list[float]:
        """Each group's value's share of all sightings."""
        return list(map(self._values.share_of, tagged))

    def _band_rate(
        self, band: _Band, out: tuple[int, ...], shares: list[float], overall: float, t: float
    ) -> float:
        """New fingerprints an hour that strangers bring through a band (its
        groups but those left `out`): as seen in its slots, and never below
        the overall rate times the kept values' shares (`shares`, per group)."""
        kept: float = math.prod(_KEPT_SHARES[out](shares))
        return max(self.band_rates.rate(band, t, RATE_EXCLUDE), overall * kept)

    def _drift(
        self,
        fp: Fingerprint,
        bands: list[_Band],
        tagged: tuple[_Tagged, ...],
        *,
        network: str,
        t: float,
        crowd: bool,
    ) -> list[_Candidate]:
        """The identities the fingerprint is a drift of: for each, its best
        justified link."""
        best: dict[str, _Candidate] = {}
        overall = self._overall_rate(t)
        share_here = max(self.crowds.share(network, t, MIN_POPULATION), MIN_NETWORK_SHARE)
        bound_here = STRANGERS_OTHER_NETWORK if crowd else STRANGERS_SAME_NETWORK
        shares: list[float] | None = None
        known_of = self._known
        # Whether any fingerprint was last seen on this network.
        here = network in self._last_on
        for band in bands:
            members = self._bands.get(band)
            if not members:
                continue
            out = _LEFT_OUT[band[0]]
            if shares is None:
                shares = self._shares(tagged)
            rate = self._band_rate(band, out, shares, overall, t)
            self._burst(fp, members, out, rate=rate, t=t, network=network, best=best)
            # Even a member seen a minute ago on this network could not
            # justify a link: nothing in this band can.
            if rate * share_here / 60 > bound_here:
                continue
            # Nor a member seen on another network before `oldest`: cheap
            # tests that spare most members the arithmetic. Never before the
            # rates' horizon: who else came through the band before it was
            # not observed, and the shares' product alone is no evidence.
            oldest = max(_oldest_elsewhere(rate, t), t - HORIZON)
            if oldest == math.inf and not here:
                continue
            for member in reversed(members):
                earlier = known_of[member]
                if earlier.last_seen >= oldest:
                    same = here and earlier.last_network == network
                elif here and earlier.last_network == network:
                    same = True
                else:
                    continue
                hours = max(t - earlier.last_seen, 60.0) / HOUR
                expected = rate * hours * (share_here if same else 1.0)
                if expected > (bound_here if same else STRANGERS_OTHER_NETWORK):
                    continue
                identity = self.find(member)
                known = best.get(identity)
                if known is not None and expected >= known.expected:
                    continue
                if not _can_drift(earlier.fingerprint, fp, out):
                    continue
                kind = LinkKind.DRIFT_SAME_NETWORK if same else LinkKind.DRIFT_BURST
                best[identity] = _Candidate(expected, identity, kind, _CHANGED[out])
        return list(best.values())

    def _burst(
        self,
        fp: Fingerprint,
        members: tuple[str, ...],
        out: tuple[int, ...],
        *,
        rate: float,
        t: float,
        network: str,
        best: dict[str, _Candidate],
    ) -> None:
        """Adds to `best` the identities of a burst in a band that leaves one
        group out: k identities that came through it from other networks
        since the oldest of them, within BURST_WINDOW. Were they and this
        fingerprint strangers, k more arrivals would have followed the
        first within that time, which a Poisson count at the band's peak
        rate allows with a chance of at most arrivals^k / k!: that is the
        expected strangers. (Only one group left out: the wider bands pool
        more strangers than their rate shows, and a burst raises its error
        to the k-th power.)"""
        if len(out) > 1 or len(members) < 2:
            return
        known_of = self._known
        recent = [
            (earlier.last_seen, member)
            for member in members
            if (earlier := known_of[member]).last_network != network
            and t - earlier.last_seen <= BURST_WINDOW
        ]
        if len(recent) < 2:
            return
        recent.sort(reverse=True)
        per_second = BURST_PEAK * rate / HOUR
        roots: set[str] = set()
        burst: list[str] = []
        for last_seen, member in recent:
            root = self.find(member)
            # A popular identity is several people: its visits are strangers'.
            if self.popular(root):
                continue
            roots.add(root)
            burst.append(member)
            k = len(roots)
            if k < 2:
                continue
            expected = _burst_chance(per_second * max(t - last_seen, 60.0), k)
            if expected > STRANGERS_OTHER_NETWORK:
                continue
            for joined in burst:
                identity = self.find(joined)
                known = best.get(identity)
                if known is not None and expected >= known.expected:
                    continue
                if _can_drift(known_of[joined].fingerprint, fp, out):
                    best[identity] = _Candidate(
                        expected, identity, LinkKind.DRIFT_BURST, _CHANGED[out]
                    )

    def _device_burst(
        self, fp: Fingerprint, tagged: tuple[_Tagged, ...], network: str, t: float
    ) -> list[_Candidate]:
        """The identities of a burst on the device when nothing else links:
        at least DEVICE_BURST identities of this device, among its
        DEVICE_BURST_SCAN seen last and within BURST_WINDOW, from other
        networks, each a browser this one could have drifted from in every
        group (an anti-detect browser drawing a new window, language and
        font noise behind a new proxy for every account leaves only the
        device in common). Counted as _burst counts a band's, at the
        device's rate of new fingerprints."""
        device = fp.groups[DEVICE]
        active = self._active.get(device)
        if not active or len(active) < DEVICE_BURST:
            return []
        recent: list[tuple[str, float]] = []
        # Most recent first: `active` is kept in the order identities were seen.
        for identity, last_seen in itertools.islice(reversed(active.items()), DEVICE_BURST_SCAN):
            if t - last_seen > BURST_WINDOW:
                break
            recent.append((identity, last_seen))
        if len(recent) < DEVICE_BURST:
            return []
        rate = max(
            self.device_rates.rate(device, t, RATE_EXCLUDE),
            self._overall_rate(t) * self._values.share_of(tagged[DEVICE]),
        )
        per_second = BURST_PEAK * rate / HOUR
        # A busy device: not even all of them together would be a burst
        # (most calls end here, before any fingerprint is compared). First
        # with every window at its floor of a minute: x^k / k! is least at
        # the smallest or the largest k.
        least = per_second * 60.0
        if (
            _burst_chance(least, DEVICE_BURST) > STRANGERS_OTHER_NETWORK
            and _burst_chance(least, len(recent)) > STRANGERS_OTHER_NETWORK
        ) or all(
            _burst_chance(per_second * max(t - last_seen, 60.0), k) > STRANGERS_OTHER_NETWORK
            for k, (_, last_seen) in enumerate(recent[DEVICE_BURST - 1 :], DEVICE_BURST)
        ):
            return []
        burst: list[tuple[str, Fingerprint]] = []
        for identity, last_seen in recent:
            known = self._known.get(identity)
            if (
                known is None
                or known.last_network == network
                or self.popular(identity)
                or not _can_drift(known.fingerprint, fp, DRIFTING)
            ):
                continue
            burst.append((identity, known.fingerprint))
            k = len(burst)
            if k < DEVICE_BURST:
                continue
            expected = _burst_chance(per_second * max(t - last_seen, 60.0), k)
            if expected <= STRANGERS_OTHER_NETWORK:
                return [
                    _Candidate(expected, identity, LinkKind.DRIFT_BURST, _changed(earlier, fp))
                    for identity, earlier in burst
                ]
        return []

    def _profile(self, fp: Fingerprint, tagged: tuple[_Tagged, ...], t: float) -> list[_Candidate]:
        """Every recently active identity of the same device whose profile
        the fingerprint matches well enough."""
        device = fp.groups[DEVICE]
        active = self._active.get(device)
        if not active:
            return []
        # Candidates: recent identities of the device that showed one of
        # this fingerprint's values. A value shown by many is no evidence
        # (its share alone would exceed the bound), so it finds nobody: the
        # look-up stays small however popular the device.
        found: dict[str, float] = {}
        for group in DRIFTING:
            holders = self._holders.get(device + tagged[group])
            if holders and len(holders) <= PROFILE_HOLDERS:
                found.update(holders)
        if not found:
            return []
        rate = max(
            self.device_rates.rate(device, t, RATE_EXCLUDE),
            self._overall_rate(t) * self._values.share_of(tagged[DEVICE]),
        )
        match = _ProfileMatch(
            fp,
            _DRIFTING_OF(tagged),
            # The least a fonts-near match can weigh (_fonts_near_share is
            # at least the share of this fingerprint's own font set).
            self._font_sets.share_of(hash(fp.fonts)),
        )
        hits: list[_Candidate] = []
        parent, profiles = self._parent, self._profiles
        for identity in found:
            last = active.get(identity)
            if last is None or t - last > PROFILE_RECENT or identity in parent:
                continue
            profile = profiles.get(identity)
            if profile is None:
                continue
            # The cheap test first: most candidates match too few groups.
            matched = _groups_matched(match.drifting, profile)
            if len(matched) + (SOFTWARE not in matched) < PROFILE_MIN_GROUPS:
                continue
            hit = self._profile_hit(
                match, identity, profile, matched, rate * max(t - last, 60.0) / HOUR
            )
            if hit is not None:
                hits.append(hit)
        return hits

    def _profile_hit(
        self,
        match: _ProfileMatch,
        identity: str,
        profile: _Profile,
        matched: list[int],
        strangers_per_match: float,
    ) -> _Candidate | None:
        """The candidate a profile that showed the `matched` groups' values
        makes, if strangers (`strangers_per_match` of the device since the
        identity was last seen, times the chance each matches) would rarely
        match as well."""
        p = 1.0
        for group in matched:
            p *= match.share(self._values, profile.values[group])
        # What the match could at best claim before the fonts are compared
        # (the costly test): on a busy device most candidates end here, far
        # above the bound whatever their fonts.
        fonts_may_count = SOFTWARE not in matched
        if (
            fonts_may_count
            and strangers_per_match * (p * match.fonts_floor) * PROFILE_SAFETY > STRANGERS_PROFILE
        ):
            return None
        if self.popular(identity):
            return None
        fonts_near = fonts_may_count and _fonts_near(match.fp, profile)
        if not fonts_near and len(matched) < PROFILE_MIN_GROUPS:
            return None
        if self.strict_profiles:
            # The shares above are of all fingerprints, as if a device's
            # values were independent of it, where a popular phone's own
            # screen and defaults are what nearly every stranger on it shows.
            p = max(p, self._device_strangers_share(match.fp, identity, matched))
        if fonts_near:
            p *= self._fonts_near_share(match.fp, profile)
        expected = strangers_per_match * p * PROFILE_SAFETY
        # The prior can only raise it: asked of candidates still under the bound.
        if (
            expected <= STRANGERS_PROFILE
            and (expected := expected / self._cycling_prior(identity, matched)) <= STRANGERS_PROFILE
        ):
            changed = tuple(GROUP_NAMES[g] for g in DRIFTING if g not in matched)
            return _Candidate(expected, identity, LinkKind.PROFILE, changed)
        return None

    def _device_strangers_share(self, fp: Fingerprint, identity: str, groups: list[int]) -> float:
        """The chance a stranger on fp's device shows fp's values in these
        groups: each value's share among the device's fingerprints but the
        identity's own, weighed with its share among all fingerprints as
        FREQUENCY_WEIGHT of them (a device seen little is judged as all are)."""
        device = fp.groups[DEVICE]
        given = self._given_device.get(device)
        if given is None:
            return 0.0
        own_total = 0
        own = dict.fromkeys(groups, 0)
        for member in self._members.get(identity, [identity]):
            known = self._known.get(member)
            if known is None or known.fingerprint.groups[DEVICE] != device:
                continue
            own_total += 1
            for group in groups:
                own[group] += known.fingerprint.groups[group] == fp.groups[group]
        others = max(0, given.total - own_total)
        tagged = _tagged(fp.groups)
        p = 1.0
        for group in groups:
            value = tagged[group]
            count = max(0, given.count(value) - own[group])
            prior = FREQUENCY_WEIGHT * self._values.share_of(value)
            p *= (count + prior) / (others + FREQUENCY_WEIGHT)
        return p

    def _fonts_near_share(self, fp: Fingerprint, profile: _Profile) -> float:
        """The chance a stranger's fonts are near one of the profile's sets:
        that of showing one of them or, when the fingerprint's own set is
        more common (a phone model's defaults, which a farm's noise keeps
        near), that of showing its set."""
        sets = self._font_sets
        return max(sets.share(map(hash, profile.font_sets)), sets.share_of(hash(fp.fonts)))

    def _cycling_prior(self, identity: str, matched: list[int]) -> float:
        """How likely the identity is to show a fingerprint that changes the
        drifting groups not matched: 1 once it showed more than one
        fingerprint. One that never changed would have to start cycling them
        now, as few new browsers do (the share that drifted in them while
        young), where a stranger need only match."""
        if identity in self._members:
            return 1.0
        unmatched = [g for g in DRIFTING if g not in matched]
        # None left (its profile outlived an unlinked fingerprint): no change to start.
        return self._drift_share(unmatched) if unmatched else 1.0

    # --- a farm's return ------------------------------------------------
    def farm_return_candidates(
        self, fp: Fingerprint, identity: str, network: str, t: float
    ) -> list[str]:
        """The older identities a young identity, now showing `fp` on
        `network`, could be the return of: those that showed one of its
        bands (never a popular one, nor a band crowded with strangers) with
        a fingerprint it could have drifted from (an update, another window
        or language, a few fonts), and those last seen on this network, if
        it is no crowd, on the same device (NETWORK_LAST_FEW); seen last
        first; none when the identity is not young or looks like many
        people, nor before the book has seen MIN_POPULATION
        fingerprints: the join crosses networks, and in a fresh book every
        identity is young, a phone everyone uses is not yet popular, and
        its owners sign up minutes apart as a farm does. Whether one of them
        was farmed, and whether this one farms, is the counters' to say
        (Decider.farm_return)."""
        if (
            self._values.total < MIN_POPULATION
            or not self._young(identity, t)
            or self.popular(identity)
        ):
            return []
        started = self._known[identity].first_seen
        found: dict[str, float] = {}
        passed: set[str] = {identity}
        for band in _bands(fp):
            members = self._bands.get(band)
            if not members or band in self._crowded_bands:
                continue
            out = _LEFT_OUT[band[0]]
            for member in members:
                root = self._older_root(member, started, passed, found)
                if root is None:
                    continue
                earlier = self._known[member]
                if _can_drift(earlier.fingerprint, fp, out):
                    found[root] = earlier.last_seen
        if not self.crowds.crowded(network, t):
            device = fp.groups[DEVICE]
            for member in self._last_few.get(network, ()):
                root = self._older_root(member, started, passed, found)
                if root is None:
                    continue
                earlier = self._known[member]
                if earlier.fingerprint.groups[DEVICE] == device and not fp.moved_back_from(
                    earlier.fingerprint
                ):
                    found[root] = earlier.last_seen
        ordered = sorted(found, key=found.__getitem__, reverse=True)
        return ordered[:FARM_RETURN_SCAN]

    def _older_root(
        self, member: str, started: float, passed: set[str], found: dict[str, float]
    ) -> str | None:
        """The identity of `member` if a young identity that started at
        `started` may be its return: one that started before and is not
        popular; None if not, or if it was looked at already."""
        root = self.find(member)
        if root in passed or root in found:
            return None
        first = self._known.get(root)
        if (first is not None and first.first_seen >= started) or self.popular(root):
            passed.add(root)
            return None
        return root

    def farm_return_joinable(
        self, fp: Fingerprint, candidates: list[str], registered: int, t: float
    ) -> list[str]:
        """Those of a young identity's `candidates` (farm_return_candidates)
        it may join as their return, now that it registered `registered`
        accounts within YOUNG: every one from its FARM_RETURN_ACCOUNTS-th
        account on; from the one before, those few strangers could have
        matched (_return_strangers at most FARM_RETURN_RARE)."""
        if registered >= FARM_RETURN_ACCOUNTS - 1:
            return candidates
        if registered < FARM_RETURN_ACCOUNTS - 2:
            return []
        return [
            farm for farm in candidates if self._return_strangers(fp, farm, t) <= FARM_RETURN_RARE
        ]

    def _return_strangers(self, fp: Fingerprint, farm: str, t: float) -> float:
        """The strangers expected to have shown one of the bands `fp` shares
        with a fingerprint of `farm` it could have drifted from, since that
        one was last seen: at the band's rate, as a drift link counts them
        (the fewest over those bands)."""
        fewest = math.inf
        overall = self._overall_rate(t)
        shares = self._shares(_tagged(fp.groups))
        for band in _bands(fp):
            members = self._bands.get(band)
            if not members or band in self._crowded_bands:
                continue
            out = _LEFT_OUT[band[0]]
            last = max(
                (
                    earlier.last_seen
                    for member in members
                    if self.find(member) == farm
                    and _can_drift((earlier := self._known[member]).fingerprint, fp, out)
                ),
                default=None,
            )
            if last is None:
                continue
            rate = self._band_rate(band, out, shares, overall, t)
            fewest = min(fewest, rate * max(t - last, 60.0) / HOUR)
        return fewest

    def join_return(self, farm: str, resolution: Resolution, t: float) -> Resolution | None:
        """Joins a resolution's young identity into the farm it is the
        return of: the resolution as it counts now (against the farm, the
        young identity among those merged), or None if they stay apart."""
        young = resolution.identity
        if not self._join(farm, young, LinkKind.FARM_RETURN, FARM_RETURN_CONFIDENCE, t):
            return None
        return resolution._replace(
            identity=self.find(young),
            links=(*resolution.links, self._merges[young]),
            merged=(*resolution.merged, young),
        )

    # --- joining and splitting -----------------------------------------
    def _join(self, keep: str, gone: str, kind: str, confidence: float, t: float) -> bool:
        keep, gone = self.find(keep), self.find(gone)
        if keep == gone:
            return False
        if self._kept_apart(keep, gone):
            return False
        self._parent[gone] = keep
        self._merges[gone] = Link(kind, gone, keep, confidence, (), t)
        self._members.setdefault(keep, [keep]).extend(self._members.pop(gone, [gone]))
        profile = self._profiles.pop(gone, None)
        if profile is not None:
            self._profiles.setdefault(keep, _Profile()).absorb(profile)
        self.spread.absorb(keep, gone)
        return True

    def _kept_apart(self, identity: str, other: str) -> bool:
        """Whether an operator split a fingerprint of one of the two
        identities (roots) from the other."""
        if not self._apart:
            return False
        mine = set(self._members.get(identity, [identity]))
        theirs = set(self._members.get(other, [other]))
        for pair in self._apart:
            a, b = tuple(pair)
            if (a in mine and b in theirs) or (b in mine and a in theirs):
                return True
        return False

    def merge(self, keep: str, gone: str, t: float) -> bool:
        """An operator's merge: joins them even if either looks popular."""
        keep_members = set(self.members(keep))
        gone_members = set(self.members(gone))
        self._apart = {
            p for p in self._apart
            if not (p & keep_members and p & gone_members)
        }  # fmt: skip
        return self._join(keep, gone, LinkKind.OPERATOR_MERGE, 1.0, t)

    def unlink(self, fingerprint: str) -> str:
        """An operator's split: the fingerprint becomes an identity of its
        own and stays apart from the one it left. Returns that identity."""
        previous = self.find(fingerprint)
        members = [m for m in self._members.get(previous, [previous]) if m != fingerprint]
        if previous == fingerprint:
            # It was the identity's root: the others stay together under
            # the next one.
            if members:
                root = members[0]
                for member in members:
                    if member == root:
                        self._parent.pop(member, None)
                    else:
                        self._parent[member] = root
                for gone, parent in list(self._parent.items()):
                    if parent == fingerprint and gone not in members:
                        self._parent[gone] = root
                self._members[root] = members
                profile = self._profiles.pop(previous, None)
                if profile is not None:
                    self._profiles[root] = profile
                previous = root
        else:
            self._members[previous] = members
        self._parent.pop(fingerprint, None)
        self._merges.pop(fingerprint, None)
        self._members[fingerprint] = [fingerprint]
        known = self._known.get(fingerprint)
        if known is not None:
            known.link = None
        forgotten = self._forgotten.get(fingerprint)
        if forgotten is not None:
            self._forgotten[fingerprint] = forgotten._replace(link=None)
        if previous != fingerprint:
            # (A fingerprint that was alone is apart from nothing.)
            self._apart.add(frozenset((fingerprint, previous)))
        return previous

    # --- restoring -----------------------------------------------------
    def restore_fingerprint(
        self, fp: Fingerprint, first_seen: float, last_seen: float, network: str
    ) -> None:
        """A fingerprint from the durable record (at start)."""
        if self.knows(fp.identity):
            return
        self._first_known = min(self._first_known, first_seen)
        self._hold(_Known(fp, first_seen, last_seen, network), _bands(fp))
        self._add_values(fp, _tagged(fp.groups))
        self._started_identities += 1

    def restore_forgotten(self, fingerprint: str) -> None:
        """A fingerprint from the durable record last seen before forget_after
        (at start): only its name (restore_link keeps more of it if it was
        linked)."""
        if not self.knows(fingerprint):
            self._forgotten_names.add(fingerprint)

    def restore_link(self, link: Link) -> None:
        """A link or merge from the durable record (at start), in order."""
        if link.kind in JOINING:
            self._join(link.target, link.source, link.kind, link.confidence, link.time)
            return
        known: _Known | _Forgotten | None = self._known.get(link.source)
        if known is None:
            known = self._forgotten.get(link.source)
            if known is None:
                if link.source not in self._forgotten_names:
                    return
                # Forgotten, and linked: kept with its link. It was linked
                # when first seen, and last seen at least that late.
                known = _Forgotten(link.time, link.time, None)
        target = self.find(link.target)
        if target == link.source or self._kept_apart(target, self.find(link.source)):
            # An operator split them: a link record followed after the
            # split was made here (read before the split's own record) does
            # not join them again.
            return
        self._members.pop(link.source, None)
        self._parent[link.source] = target
        self._members.setdefault(target, [target]).append(link.source)
        if isinstance(known, _Known):
            known.link = link
            # It started no identity; one that drifted young is counted so.
            self._started_identities -= 1
        else:
            self._forgotten[link.source] = known._replace(link=link)
        if link.kind == LinkKind.DRIFT_SAME_NETWORK and self._young(target, link.time):
            self._drifted_young_in(target, link.changed)

    def restore_sighting(self, fingerprint: str, network: str, t: float) -> None:
        """A sighting from the durable record (at start), in time order."""
        known = self._known.get(fingerprint)
        if known is None:
            return
        if self._started is None or t < self._started:
            self._started = t
            self._first_known = min(self._first_known, t)
        identity = self.find(fingerprint)
        crowd = self.crowds.crowded(network, t)
        fp = known.fingerprint
        known.last_seen = max(known.last_seen, t)
        self._move(known, network)
        self.band_rates.see_all(_bands(fp), t)
        self.device_rates.see(fp.groups[DEVICE], t)
        self.spread.see(identity, network, t, crowd, fresh=self.fresh(t))
        self.identity_rates.see(identity, t)
        self.crowds.see(network, identity, t)


def _repeat(known: _Known, network: str, t: float) -> bool:
    """Whether a sighting repeats the fingerprint's last one: the same
    network within the same REPEAT_SLOT (the finest slot any rate keeps)."""
    return known.last_network == network and (t // REPEAT_SLOT) == (known.last_seen // REPEAT_SLOT)


def _oldest_elsewhere(rate: float, t: float) -> float:
    """The earliest last sighting on another network that a band seen at
    `rate` could still justify a drift link from: the longest the bound
    allows, with a margin for rounding; inf when even one seen a minute ago
    could not."""
    if rate * _MIN_HOURS > STRANGERS_OTHER_NETWORK:
        return math.inf
    if rate <= 0:
        return -math.inf
    return t - STRANGERS_OTHER_NETWORK / rate * HOUR * 1.000001 - 1.0


def _burst_chance(arrivals: float, k: int) -> float:
    """At most the chance of k or more arrivals where `arrivals` are
    expected (a Poisson count's tail, bounded by its first term)."""
    return arrivals**k / math.factorial(k)


def _changed(earlier: Fingerprint, fp: Fingerprint) -> tuple[str, ...]:
    """The drifting groups in which `fp` differs from `earlier`."""
    return tuple(GROUP_NAMES[g] for g in DRIFTING if fp.groups[g] != earlier.groups[g])


def _can_drift(earlier: Fingerprint, fp: Fingerprint, out: tuple[int, ...]) -> bool:
    """Whether `fp` can be `earlier` after drifting in the groups left out:
    versions never go backwards, and font sets stay alike."""
    if VERSION in out and fp.moved_back_from(earlier):
        return False
    return SOFTWARE not in out or fonts_alike(fp.fonts, earlier.fonts, FONTS_ALIKE)


def _groups_matched(drifting: tuple[_Tagged, ...], profile: _Profile) -> list[int]:
    """The drifting groups whose value (`drifting`, the fingerprint's tagged
    values of DRIFTING) the profile showed: one pass in C over the groups,
    as this runs for every candidate."""
    return list(
        itertools.compress(DRIFTING, map(operator.contains, _DRIFTING_OF(profile.values), drifting))
    )


def _fonts_near(fp: Fingerprint, profile: _Profile) -> bool:
    """Whether the fonts are near one of the profile's font sets."""
    fonts = fp.fonts
    return any(fonts_alike(fonts, font_set, FONTS_NEAR) for font_set in profile.font_sets)


class _ProfileMatch:
    """One fingerprint's profile look-up: what every candidate is compared
    with, and the shares of the values candidates showed (found through a
    value, most showed it alone, so one share serves many of them)."""

    __slots__ = ("_shares", "drifting", "fonts_floor", "fp")

    def __init__(self, fp: Fingerprint, drifting: tuple[_Tagged, ...], fonts_floor: float) -> None:
        self.fp = fp
        self.drifting = drifting
        self.fonts_floor = fonts_floor
        self._shares: dict[tuple[_Tagged, ...], float] = {}

    def share(self, frequencies: Frequencies, values: tuple[_Tagged, ...]) -> float:
        share = self._shares.get(values)
        if share is None:
            share = self._shares[values] = frequencies.share(values)
        return share


def _made(recent: dict[_K, dict[str, float]], key: _K) -> dict[str, float]:
    """The key's dict, made when missing (setdefault would make one each time)."""
    found = recent.get(key)
    if found is None:
        found = recent[key] = {}
    return found


def _drop(recent: dict[_K, dict[str, float]], key: _K, identity: str) -> None:
    """Drops an identity from a key's recent ones, and the key once empty."""
    seen = recent.get(key)
    if seen is not None:
        seen.pop(identity, None)
        if not seen:
            del recent[key]


def _touch(recent: dict[str, float], identity: str, t: float) -> None:
    """Marks an identity seen at t, dropping what PROFILE_RECENT no longer covers."""
    renew(recent, identity, t)
    drop_older(recent, t - PROFILE_RECENT)


def _confidence(expected: float) -> float:
    return max(0.0, min(1.0, 1.0 - expected))


def rate_per_hour(
    book: IdentityBook,
    identity: str,
    t: float,
    *,
    within: float = math.inf,
    leave_out: float = RATE_EXCLUDE,
) -> float:
    """How often the identity is seen an hour: over the last `within` the
    book watched (its whole horizon by default), but the last `leave_out`."""
    return book.identity_rates.rate(identity, t, leave_out, max(book.watched_since, t - within))
